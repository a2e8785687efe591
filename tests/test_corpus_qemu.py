"""QEMU's migration baseline on the real corpus (needs QEMU and `make corpus-small`)."""

from __future__ import annotations

import shutil

import pytest

from bench.corpus.guest import QEMU, GuestSpec, qemu_argv
from federation.demo.corpus import ManifestError, load_manifest


def _corpus_missing() -> str | None:
    if shutil.which(QEMU) is None:
        return f"no {QEMU} (make corpus installs qemu-system-x86)"
    try:
        load_manifest().ram(256, "A", 60)
    except ManifestError as e:
        return f"no 256 MiB corpus snapshot (make corpus-small): {e}"
    return None


def test_guest_ram_is_a_shared_file_the_same_on_source_and_target(tmp_path) -> None:
    spec = GuestSpec(tmp_path / "vmlinuz", tmp_path / "initrd", 1024, "B")
    src = qemu_argv(spec, tmp_path / "q1", tmp_path / "mem")
    dst = qemu_argv(spec, tmp_path / "q2", None, incoming="defer")
    backend = src[src.index("-object") + 1]
    assert backend == f"memory-backend-file,id=mem,size=1024M,mem-path={tmp_path / 'mem'},share=on"
    assert "dwcp.workload=B" in src[src.index("-append") + 1]
    # same machine, same RAM block id and size: only the backend and -incoming differ
    assert dst[dst.index("-object") + 1] == "memory-backend-ram,id=mem,size=1024M"
    assert [a for a in src if "mem" not in a and "q1" not in a] == [
        a for a in dst[:-2] if "mem" not in a and "q2" not in a
    ]
    assert dst[-2:] == ["-incoming", "defer"]


@pytest.mark.slow
def test_qemu_multifd_zstd_migrates_the_snapshot_and_the_relay_counts_it() -> None:
    missing = _corpus_missing()
    if missing:
        pytest.skip(missing)
    from bench.qemu import measure_qemu_multifd_zstd

    r = measure_qemu_multifd_zstd(guest_mib=256, workload="A", at_s=60, mode="snapshot")
    assert r["target_status"] == "completed"
    assert r["source_ram_unchanged"] is True
    assert r["connections"] == 1 + r["channels"]  # main channel + one per multifd channel
    # QEMU 7.2 counts pages before compression; the relay counts what zstd left of them
    assert 0 < r["wire_bytes"] < r["qemu_ram_transferred"] <= 256 << 20
