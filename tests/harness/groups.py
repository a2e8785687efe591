"""Which tests must never run beside each other when ``make test`` runs on several
pytest-xdist workers (``-n 2 --dist loadgroup``).

The machine has two cores; most of the suite is CPU-bound simulator work that runs on
either worker in any order. A few tests hold a machine-wide resource or measure time:

* a booted QEMU guest under TCG eats a whole core (two at once would starve the guests'
  own checks and the migration timeouts);
* the network-namespace tests time copies through a tbf-shaped veth (``bench.netns``)
  and set up and tear down namespaces and links with ``ip``;
* tests that kill -9 real replicas or time a real transfer, whose view timeouts and
  figures assume they are not sharing a core with a second such test.

These all go into one xdist group, :data:`EXCLUSIVE`: xdist runs a group's tests one
after another on one worker, so at most one of them runs at a time, while the other
worker keeps running the rest of the suite. ``--dist loadgroup`` hands out the scopes
with the most tests first, so this group (about 30 tests, some 11 % of the suite's
test time) starts at once rather than trailing at the end.

A test joins the group by the ``exclusive`` marker, or automatically when its module
uses the QEMU or network-namespace helpers (:func:`exclusive_reason`), so a new QEMU
test cannot be forgotten.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["EXCLUSIVE", "MACHINE_HELPERS", "exclusive_reason"]

#: The xdist group name of the tests that must not overlap.
EXCLUSIVE = "exclusive"

#: Names whose presence in a test module means it boots QEMU or builds network
#: namespaces (the capability checks every such module imports to skip without them).
MACHINE_HELPERS = frozenset({
    "qemu_missing", "qemu_lab", "qemu_nodes", "QemuLab", "QemuBackend", "qemu_argv",
    "netns_missing", "TbfLink",
})


def exclusive_reason(module: ModuleType | None, marker_names: set[str]) -> str | None:
    """Why a test belongs to :data:`EXCLUSIVE`, or None."""
    if EXCLUSIVE in marker_names:
        return "marked exclusive"
    if module is None:
        return None
    used = MACHINE_HELPERS & set(vars(module))
    if used:
        return f"its module uses {', '.join(sorted(used))}"
    return None
