"""Federation files are never silently replaced, and mismatched ones are named (issue 16
items 4 and 5): ``federation init`` refuses a directory that has keys; ``dwcp federation
rotate-key`` is survived by a running federation; a peer presenting another key than the
file's is named at start (log) and in ``/ready``; a DC running another federation file
is refused with both digests and the differing DCs; ``federation check`` warns below 4
DCs; ``/ready`` is false while this DC cannot reach a quorum."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from consensus.ledger import SetPolicy
from federation import config
from federation.api.client import import_vm
from federation.config_print import federation_print
from federation.demo.processes import free_base_port
from mesh.federation_print import FederationPrint
from tests.harness.node import memory_image
from tests.harness.processes import NAMES, node_processes, run_dwcp


def test_differences_name_the_dcs_that_differ() -> None:
    ours = FederationPrint.of(b"\x01" * 32, [("dc1", b"a"), ("dc2", b"b"), ("dc3", b"c")])
    theirs = FederationPrint.of(b"\x02" * 32, [("dc1", b"a"), ("dc2", b"B"), ("dc9", b"z")])
    why = ours.differences("dc4", theirs.digest, theirs.encoded_entries())
    assert why == (f"dc4's federation file has digest {'02' * 8}, ours {'01' * 8}: the keys "
                   "of dc2 differ; dc3 only in ours; 1 DC(s) only in dc4's")
    same = FederationPrint.of(b"\x03" * 32, ours.entries)
    assert "the DCs agree; other settings differ" in ours.differences(
        "dc4", same.digest, same.encoded_entries())
    assert ours.differences("dc4", ours.digest, b"") == ""


def test_init_refuses_an_existing_federation_and_check_warns_below_four(tmp_path: Path) -> None:
    d = tmp_path / "fed"
    port = str(free_base_port(4))
    r = run_dwcp("federation", "init", "--dir", str(d), "--dcs", "3", "--base-port", port)
    assert r.returncode == 0, r.stderr
    key = (d / "keys" / "dc1.key").read_bytes()
    r = run_dwcp("federation", "init", "--dir", str(d), "--dcs", "4", "--base-port", port)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"dwcp federation: {d} already holds federation.toml, keys/ (4 key files), nodes/: "
        "refusing to replace them (their keys are a running federation's identities); "
        "choose another --dir, or give --force to make a new federation there")
    assert (d / "keys" / "dc1.key").read_bytes() == key  # nothing was touched
    r = run_dwcp("federation", "check", str(d / "federation.toml"))
    assert r.returncode == 0
    assert r.stdout.splitlines()[-1] == (
        "warning: 3 DCs: no fault tolerance. PBFT needs at least 4 DCs (3f+1, f >= 1) to "
        "survive one faulty DC; this federation has no ledger, so no VM can be imported, "
        "migrated or deleted")
    r = run_dwcp("federation", "init", "--dir", str(d), "--dcs", "4", "--base-port", port,
                 "--force")
    assert r.returncode == 0 and (d / "keys" / "dc1.key").read_bytes() != key
    r = run_dwcp("federation", "check", str(d / "federation.toml"))
    digest = federation_print(config.load(d / "federation.toml")).digest.hex()
    assert "warning" not in r.stdout and f"digest {digest} " in r.stdout


def _without_dc3(cfg: Path) -> dict[str, Path]:
    """dc4 runs a federation file that omits dc3 (and so has no ledger)."""
    text = re.sub(r'\[\[dc\]\]\nname = "dc3"\n(?:[^\[\n].*\n|\n)*', "", cfg.read_text())
    view = cfg.with_name("federation-dc4.toml")
    view.write_text(text)
    assert config.load(view).names == ("dc1", "dc2", "dc4")
    return {"dc4": view}


@pytest.mark.processes
def test_a_dc_with_another_federation_file_is_refused_naming_what_differs(
        tmp_path: Path) -> None:
    with node_processes(tmp_path, views=_without_dc3, ready=("dc1", "dc2", "dc3")) as nodes:
        ours = federation_print(nodes.fed).digest.hex()[:16]
        theirs = federation_print(config.load(nodes.cfg.with_name("federation-dc4.toml")))
        mismatch = (f"dc4's federation file has digest {theirs.digest.hex()[:16]}, ours "
                    f"{ours}: dc3 only in ours")
        doc = nodes.wait("dc1 names dc4's file", lambda: (
            (d := nodes.ready_doc("dc1"))["problems"] == [mismatch] and d))
        assert doc["ready"] is True  # dc1, dc2, dc3 are a quorum
        assert doc["reason"] == f"ready (a quorum is connected), but; {mismatch}"
        # both peers' mismatches: dc1's and dc2's handshakes are refused one after the other
        at_dc4 = nodes.wait("dc4 names both others' file", lambda: (
            len((d := nodes.ready_doc("dc4"))["problems"]) == 2 and d))
        assert at_dc4["ready"] is False
        assert at_dc4["reason"].startswith("no ledger in this federation: PBFT needs n = 3f+1")
        assert all(p.endswith(f", ours {theirs.digest.hex()[:16]}: 1 DC(s) only in {dc}'s")
                   for p, dc in zip(at_dc4["problems"], ("dc1", "dc2"), strict=True))
        logged = nodes.log_events("dc4", "peer_mismatch")
        assert logged and logged[0]["reason"] == "federation_mismatch"
        # this DC cannot reach a quorum: not ready, saying so
        assert nodes.stop("dc2") == 0 and nodes.stop("dc3") == 0
        doc = nodes.wait("dc1 not ready", lambda: (
            (d := nodes.ready_doc("dc1"))["ready"] is False and d))
        assert doc["reason"] == ("this DC cannot reach a quorum: 1 of 4 DCs connected, a "
                                 f"quorum is 3; {mismatch}")
        assert nodes.api("dc1").call("GET", "/ready")[0] == 503


@pytest.mark.processes
def test_a_running_federation_survives_rotate_key(tmp_path: Path) -> None:
    memory = memory_image(tmp_path / "memory.img", 1 << 20)
    with node_processes(tmp_path) as nodes:
        import_vm(nodes.api("dc1"), "vm1", str(memory))
        old = str(nodes.fed.dc("dc2").public_key)
        r = run_dwcp("federation", "rotate-key", "dc2", "--config", str(nodes.cfg))
        assert r.returncode == 0, r.stderr
        new = str(config.load(nodes.cfg).dc("dc2").public_key)
        assert new != old and f"dc2: new key {new} in " in r.stdout
        # dc2 restarts with its new key; dc1 still runs the old file and says what it sees
        assert nodes.stop("dc2") == 0
        nodes.start("dc2")
        said = f"dc2 presents key {new}, the federation file says {old}"
        doc = nodes.wait("dc1 names dc2's new key", lambda: (
            said in (d := nodes.ready_doc("dc1"))["problems"] and d))
        assert doc["ready"] is True and said in doc["reason"]
        assert any(e["detail"] == said for e in nodes.log_events("dc1", "peer_mismatch"))
        # every other node restarts on the new file, one after the other (the ledger
        # pauses while only two DCs run the same file: docs/operations.md)
        for name in ("dc1", "dc3", "dc4"):
            assert nodes.stop(name) == 0
            nodes.start(name)
        nodes.wait("every DC ready, nothing refused", lambda: all(
            (d := nodes.ready_doc(n))["ready"] and not d["problems"] for n in NAMES),
            timeout=60)
        agreed = nodes.wait("every ledger agrees on vm1", lambda: nodes.agreed("vm1"))
        assert agreed["owner_epoch"] == ("dc1", 0)
        # the ledger goes on, dc2 (on its new key) among its replicas
        assert nodes.api("dc2").ok("POST", "/api/policy",
                                   SetPolicy(25, (), (), False))["v3_percent"] == 25
        nodes.wait("the policy everywhere", lambda: all(
            nodes.api(n).ok("GET", "/api/policy")["v3_percent"] == 25 for n in NAMES))
        assert nodes.stop_all() == {n: 0 for n in NAMES}
