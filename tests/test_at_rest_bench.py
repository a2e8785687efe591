"""``dwcp bench at-rest`` and ``dwcp bench authz`` on small real data (smoke): every
figure is measured, the sealed images verify, the plain and sealed runs are side by
side."""

from __future__ import annotations

import json

import pytest

from bench.at_rest import run as run_at_rest
from bench.authz import run as run_authz


def test_at_rest_bench_measures_both_modes_on_real_data() -> None:
    out = run_at_rest(quick=True)
    json.dumps(out)  # one JSON object
    assert out["image"].startswith("no corpus: this process's own memory")
    assert out["image_bytes"] > 0 and out["image_bytes"] % 4096 == 0
    for mode in ("plain", "sealed"):
        for phase in ("store", "index", "cold", "warm"):
            fig = out[mode][phase]
            assert fig["s"] > 0 and fig["MBps"] > 0, (mode, phase, fig)
    assert set(out["sealed_cost"]) == {"store", "index", "cold", "warm"}
    # sealing keeps zero chunks as holes: never more disk than the plain copy plus entries
    plain, sealed = out["plain"]["disk_bytes"], out["sealed"]["disk_bytes"]
    assert all(sealed[k] <= plain[k] * 1.01 + (1 << 16) for k in plain)


def test_authz_bench_measures_sign_check_and_execute() -> None:
    out = run_authz(commands=50, repeats=1)
    json.dumps(out)
    assert 0 < out["sign_us"] and 0 < out["check_us"] and 0 < out["execute_us"]
    for name in ("sign_us", "check_us", "execute_us", "execute_replica_us"):
        assert 0 < out[f"{name}_min"] <= out[name]
    assert out["authorization_bytes"] < out["command_bytes"]
    assert out["per_commit_cpu_us"]["n16"] > out["per_commit_cpu_us"]["n4"]


def test_authz_bench_verifies_every_request_in_every_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The passes reuse their requests; the memo of verified signatures
    (consensus.authz) must not turn the later passes' checks into lookups."""
    from mesh.identity import PublicKey

    calls = []
    real = PublicKey.verify

    def counted(self: PublicKey, data: bytes, signature: bytes) -> bool:
        calls.append(1)
        return real(self, data, signature)

    monkeypatch.setattr(PublicKey, "verify", counted)
    run_authz(commands=20, repeats=2)
    # check passes, execute passes, then the execute passes of a replica's ledger
    assert len(calls) == 20 * 2 + 20 * 2 + 20 * 2
