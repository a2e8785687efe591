"""A ``dwcp node`` whose VMs named with ``--writer`` run the demo's page writer as their guest
(:class:`federation.demo.guest_backend.WritingBackend`): how ``dwcp demo`` starts the DC its
VM is imported at. The production ``dwcp node`` has no such option, and the HTTP API no
writer field.

::

    python -c "from federation.demo.writer_node import main; main()" \\
        --config FILE --name DC --writer VM=RATE[:SEED] [--writer ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from federation.cli.main import CommandError
from federation.cli.run_node import add_node_arguments, run_node
from federation.demo.guest_backend import WriterSetting, WritingBackend
from federation.vms.backend import VmError

__all__ = ["main", "parse_writer", "writer_args"]


def parse_writer(text: str) -> tuple[str, WriterSetting]:
    """``VM=RATE[:SEED]`` -> (VM, setting); raises ``argparse.ArgumentTypeError``."""
    vm, sep, spec = text.partition("=")
    rate, _, seed = spec.partition(":")
    try:
        if not vm or not sep:
            raise ValueError("expected VM=RATE[:SEED]")
        return vm, WriterSetting(int(seed or 0), float(rate))
    except (ValueError, VmError) as exc:
        raise argparse.ArgumentTypeError(f"--writer {text!r}: {exc}") from None


def writer_args(writers: dict[str, WriterSetting]) -> list[str]:
    """The command-line options that give a node these writers."""
    return [f"--writer={vm}={s.rate}:{s.seed}" for vm, s in sorted(writers.items())]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dwcp-demo-node",
                                description="a dwcp node whose named VMs run a page writer")
    add_node_arguments(p)
    p.add_argument("--writer", action="append", type=parse_writer, default=[],
                   metavar="VM=RATE[:SEED]", help="VM VM gets a page writer dirtying RATE "
                   "pages per second (content from SEED) whenever it runs here")
    args = p.parse_args(argv)
    writers = dict(args.writer)
    try:
        return run_node(args, backend=lambda data: WritingBackend(Path(data) / "vms", writers))
    except CommandError as exc:
        print(f"dwcp-demo-node: {exc}", file=sys.stderr)
        return 2
