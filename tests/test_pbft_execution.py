"""A replica's execution of a batch (consensus.pbft.execution): every command's operator
signature is checked by the replica that executes it, a forged one inside a batch is
refused alone at every replica even beside warm caches, and the work done once per batch
(the batch's digest, the exactly-once lookup, the checkpoint's hash) gives what it gave
when it was done several times."""

from __future__ import annotations

import hashlib

import attrs

import consensus.authz as authz
from consensus.authz import Authorization, SignedRequest, open_authorization
from consensus.ledger import AnnounceRoot, Ledger, LedgerResult, RegisterVm
from consensus.ledger_commands import CLIENT_WINDOW
from consensus.pbft.messages import Checkpoint
from consensus.pbft.replica import Replica
from mesh import wire
from sim.hosts.operators import SIM_OPERATORS
from sim.hosts.pbft_cluster import SIM_CONFIG, PbftCluster
from sim.scenario import Run, ScenarioSpec
from tests.harness.ledger import register

SMALL = attrs.evolve(SIM_CONFIG, checkpoint_interval=4, window=8)


def cluster(seed: int = 1, n: int = 4) -> PbftCluster:
    spec = ScenarioSpec("test", lambda r: None, n, 10.0, 10.0, (), "", 4)
    return PbftCluster(Run(spec, seed, n, False), config=SMALL)


def submit_many(c: PbftCluster, name: str, commands: list[RegisterVm]) -> None:
    """One signed REQUEST carrying ``commands`` from DC ``name``."""

    def go(rep: Replica, now: float) -> list[object]:
        rids, actions = rep.submit_many(now, tuple(wire.encode(x) for x in commands))
        c.submitted[name].update(rids)
        return actions  # type: ignore[return-value]

    assert c.world.invoke(name, "pbft", go, "submit")


def settle(c: PbftCluster, until: float = 30.0) -> None:
    assert c.world.run(until=until, predicate=lambda w: c.problem is None and c.settled(w)), (
        c.problem, {m: r.status() for m in c.names if (r := c.replica(m))})
    assert c.problem is None


def signature_of(a: Authorization) -> bytes:
    return wire.decode(a.request, expect=(SignedRequest,)).signature  # type: ignore[no-any-return]


def resigned(a: Authorization, signature: bytes) -> Authorization:
    signed = wire.decode(a.request, expect=(SignedRequest,))
    return Authorization(wire.encode(SignedRequest(signed.operator, signed.head, signature)),
                         a.body)


def test_a_forged_operator_signature_inside_a_batch_is_refused_alone_at_every_replica(
) -> None:
    """A DC's REQUEST of five commands, one of which carries another request's genuine
    signature under its own head. The simulator's replicas share one process, so the
    memo of verified signatures is warm with every genuine request (the door's check, as
    in a node) before the batch executes: the forgery is refused at all four replicas
    and only it; the others apply, and the replicas agree on the state."""
    c = cluster()
    c.world.run(until=0.05)
    owner = c.names[1]
    genuine = [register(f"vm{i}", owner, at=1.0) for i in range(4)]
    for cmd in genuine:
        open_authorization(SIM_OPERATORS, cmd.authorization)  # warm: verified once here
    forged = register("vm-forged", owner, at=1.0)
    forged = RegisterVm(forged.vm, owner,
                        resigned(forged.authorization, signature_of(genuine[0].authorization)))
    submit_many(c, owner, [genuine[0], forged, *genuine[1:]])
    settle(c)
    digests = set()
    for name in c.names:
        rep = c.replica(name)
        assert rep is not None
        ledger = rep.state.ledger
        assert sorted(ledger.vms) == ["vm0", "vm1", "vm2", "vm3"], name
        assert ledger.refusals == {"authorization": 1}, name
        digests.add(ledger.state_digest())
    assert len(digests) == 1
    results = [n.detail for n in c.world.notifications
               if n.node == owner and n.kind == "ledger.committed"]
    by_id = {d["request_id"]: wire.decode(d["result"], expect=(LedgerResult,)) for d in results}
    assert [by_id[rid].ok for rid in sorted(by_id)] == [True, False, True, True, True]
    assert "not operator 'ops''s over this request" in by_id[sorted(by_id)[1]].error


def test_a_replica_with_a_cold_memo_checks_every_command_of_a_batch_itself() -> None:
    """The same commands executed by a ledger in a process whose memo is empty (a replica
    of its own): every operator signature is verified there, the forged one fails."""
    owner = "n1"
    genuine = [register(f"vm{i}", owner, at=1.0) for i in range(3)]
    forged = register("vm-forged", owner, at=1.0)
    forged = RegisterVm(forged.vm, owner,
                        resigned(forged.authorization, signature_of(genuine[2].authorization)))
    verified: list[bytes] = []
    real = authz._signature_ok

    def counted(key, head, signature):  # type: ignore[no-untyped-def]
        ok = real(key, head, signature)
        verified.append(head)
        return ok

    authz._VERIFIED.clear()
    authz._signature_ok = counted  # type: ignore[assignment]
    try:
        ledger = Ledger(("n0", "n1", "n2", "n3"), SIM_OPERATORS)
        ledger.snapshot()  # as a replica's ledger: its snapshot encoder follows every change
        oks = [wire.decode(ledger.execute(owner, i + 1, wire.encode(cmd), 1.0)).ok
               for i, cmd in enumerate([*genuine, forged])]
    finally:
        authz._signature_ok = real  # type: ignore[assignment]
    assert oks == [True, True, True, False]
    assert len(verified) == 4
    assert not any(k[1] == wire.decode(forged.authorization.request).head
                   for k in authz._VERIFIED)  # a failure is never remembered


def test_execute_once_says_whether_the_request_was_applied_now() -> None:
    ledger = Ledger(("n0", "n1", "n2", "n3"), SIM_OPERATORS)
    cmd = wire.encode(register("vm1", "n1", at=1.0))
    first, fresh = ledger.execute_once("n1", 1, cmd, 1.0)
    assert fresh and wire.decode(first).ok
    again, fresh = ledger.execute_once("n1", 1, cmd, 2.0)
    assert (again, fresh) == (first, False)
    assert ledger.execute("n1", 1, cmd, 2.0) == first
    # past the exactly-once window: an old id is answered with the refusal, not applied
    filler = wire.encode(AnnounceRoot("no-such-migration", b"\x01" * 32))  # refused, cheaply
    for rid in range(2, CLIENT_WINDOW + 3):
        ledger.execute_once("n1", rid, filler, 1.0)
    old, fresh = ledger.execute_once("n1", 1, cmd, 3.0)
    assert not fresh and ledger.executed_result("n1", 1) == old
    assert not wire.decode(old).ok


def test_the_checkpoint_digest_is_the_hash_of_the_snapshot_kept_with_it() -> None:
    """The snapshot is hashed once per checkpoint: the digest kept beside it and the one
    every replica signed (its stable checkpoint's proof) are SHA-256 of the kept bytes,
    and those bytes restore to a ledger of that digest."""
    c = cluster()
    c.world.run(until=0.05)
    for i in range(30):
        c.world.at(0.1 + i * 0.05, lambda w, i=i: c.submit(
            c.names[i % 4], register(f"vm{i}", c.names[i % 4])), f"submit {i}")
    c.world.run(until=0.1 + 30 * 0.05)  # every submission made, then until settled
    settle(c)
    for name in c.names:
        rep = c.replica(name)
        assert rep is not None
        st = rep.state
        for seq, (snap, dig) in st.snapshots.items():
            assert hashlib.sha256(snap).digest() == dig, (name, seq)
        assert st.low > 0 and st.stable_proof, name
        for signed in st.stable_proof:
            vote = st.verifier.open(signed, (Checkpoint,))
            assert isinstance(vote, Checkpoint) and vote.seq == st.low
            assert vote.state_digest == hashlib.sha256(st.stable_snapshot).digest()
        restored = Ledger.restore(st.ledger.members, st.stable_snapshot, SIM_OPERATORS)
        assert restored.state_digest() == hashlib.sha256(st.stable_snapshot).digest()
