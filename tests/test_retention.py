"""What a DC keeps on disk (issue 16 item 7, issue 15 item 6): sealed images in the image
backend, the retained copies' budget, purge, and imports that leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.vms.backend import VmError, VmState
from federation.vms.image_backend import ImageBackend
from federation.vms.retention import VmUsage, evictions, parse_size
from federation.vms.sealing import SealError, SealKey
from mesh.hde.image import PAGE_SIZE
from tests.harness.data import real_pages

KEY = SealKey(bytes(range(32)))


def retire(backend: ImageBackend, name: str, layout: list[tuple[str, int]],
           fill: bytes) -> None:
    """Bring ``name`` in as a migration target would, then see it leave again."""
    mid = f"in-{name}"
    writers = backend.prepare_incoming(name, layout, mid)
    for img, count in layout:
        size = count * PAGE_SIZE
        writers[img].write(0, (fill * (size // len(fill) + 1))[:size])
        writers[img].close()
    backend.start(name, 1)
    backend.fence(name, f"out-{name}")
    backend.retire(name, f"out-{name}")


# --------------------------------------------------------------------- sealed at rest


def test_a_stolen_data_directory_reveals_no_page(tmp_path: Path) -> None:
    mem = tmp_path / "mem.raw"
    plain = real_pages(64)
    mem.write_bytes(plain)
    backend = ImageBackend(tmp_path / "vms", seal_key=KEY)
    backend.import_vm("web", mem)
    retire(backend, "gone", [("memory", 32)], b"secret retained page ")
    stolen = b"".join(p.read_bytes() for p in (tmp_path / "vms").rglob("*.img"))
    for i in range(64):  # no page of the import, nor a piece of one
        assert plain[i * PAGE_SIZE: i * PAGE_SIZE + 48] not in stolen
    assert b"secret retained page" not in stolen
    # the node with its key reads them; the same directory under another key does not
    img = backend.open_images("web")["memory"]
    assert bytes(img.view(0, 64)) == plain
    img.close()
    thief = ImageBackend(tmp_path / "vms", seal_key=SealKey(bytes(32)))
    with pytest.raises(VmError, match="sealed under at-rest key"):
        thief.open_images("web")


def test_plain_images_are_sealed_when_a_key_first_comes(tmp_path: Path) -> None:
    mem = tmp_path / "mem.raw"
    mem.write_bytes(real_pages(16))
    ImageBackend(tmp_path / "vms").import_vm("old", mem)  # a data dir from before the key
    raw = (tmp_path / "vms" / "old" / "memory.img").read_bytes()
    assert raw == mem.read_bytes()
    sealed = ImageBackend(tmp_path / "vms", seal_key=KEY)
    assert (tmp_path / "vms" / "old" / "memory.img").read_bytes()[:8] == b"DWCPSEAL"
    img = sealed.open_images("old")["memory"]
    assert bytes(img.view(0, 16)) == mem.read_bytes()
    img.close()


def test_tampering_with_a_stored_image_is_a_clear_vm_error(tmp_path: Path) -> None:
    mem = tmp_path / "mem.raw"
    mem.write_bytes(real_pages(32))
    backend = ImageBackend(tmp_path / "vms", seal_key=KEY)
    backend.import_vm("web", mem)
    path = tmp_path / "vms" / "web" / "memory.img"
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 1
    path.write_bytes(bytes(raw))
    img = backend.open_images("web")["memory"]
    with pytest.raises(SealError, match=r"web/memory: chunk 1 \(pages 16..31\) fails "):
        img.view(20)
    img.close()


# --------------------------------------------------------------------- imports


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "sealed"])
def test_a_failed_import_leaves_nothing_behind(tmp_path: Path, key: SealKey | None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    mem, disk = tmp_path / "mem.raw", tmp_path / "disk.raw"
    mem.write_bytes(real_pages(16))
    disk.write_bytes(real_pages(16, b"disk"))
    backend = ImageBackend(tmp_path / "vms", seal_key=key)
    calls = []
    real = backend._copy_in

    def failing(src: Path, dst: Path) -> None:
        calls.append(dst.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(backend, "_copy_in", failing)
    with pytest.raises(OSError, match="No space left"):
        backend.import_vm("web", mem, [disk])
    assert list((tmp_path / "vms").iterdir()) == []
    with pytest.raises(VmError, match="no VM"):
        backend.info("web")


def test_crash_leftovers_are_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "vms"
    backend = ImageBackend(root, seal_key=KEY)
    retire(backend, "kept", [("memory", 16)], b"k")
    (root / ".half.importing").mkdir()
    (root / ".half.importing" / "memory.img").write_bytes(b"x" * PAGE_SIZE)
    (root / ".old.purging").mkdir()
    (root / "kept" / "memory.img.new").write_bytes(b"unpublished")
    (root / "kept" / "disk-0.img.sealing").write_bytes(b"half sealed")
    ImageBackend(root, seal_key=KEY)
    assert sorted(p.name for p in root.iterdir()) == ["kept"]
    assert sorted(p.name for p in (root / "kept").iterdir()) == ["memory.img", "meta.json"]


# --------------------------------------------------------------------- retention


def test_retained_copies_beyond_the_budget_go_oldest_first(tmp_path: Path) -> None:
    backend = ImageBackend(tmp_path / "vms", seal_key=KEY)
    for i in range(4):
        retire(backend, f"vm{i}", [("memory", 256)], bytes([i + 1]) * 7)
    sizes = {u.name: u.disk_bytes for u in backend.usage()}
    assert all(s >= 256 * PAGE_SIZE for s in sizes.values())
    backend.retain_bytes = sizes["vm2"] + sizes["vm3"]
    assert backend.enforce_retention() == ["vm0", "vm1"]
    assert [v.name for v in backend.list_vms()] == ["vm2", "vm3"]
    assert backend.purged["budget"] == (2, sizes["vm0"] + sizes["vm1"])
    # a new retirement pushes the oldest out at once; a running VM is never counted out
    mem = tmp_path / "mem.raw"
    mem.write_bytes(real_pages(512))
    backend.import_vm("live", mem)
    backend.start("live", 0)
    retire(backend, "vm4", [("memory", 256)], b"\x09" * 7)
    assert [v.name for v in backend.list_vms()] == ["live", "vm3", "vm4"]


def test_a_copy_reused_as_a_base_is_no_longer_retained(tmp_path: Path) -> None:
    backend = ImageBackend(tmp_path / "vms", seal_key=KEY, retain_bytes=0)
    writers = backend.prepare_incoming("back", [("memory", 16)], "m1")
    for w in writers.values():
        w.close()
    assert backend.info("back").state is VmState.INCOMING
    assert backend.enforce_retention() == []  # arriving: not a retained copy


def test_purge_removes_a_retained_copy_and_refuses_anything_else(tmp_path: Path) -> None:
    backend = ImageBackend(tmp_path / "vms", seal_key=KEY)
    retire(backend, "gone", [("memory", 64)], b"g")
    mem = tmp_path / "mem.raw"
    mem.write_bytes(real_pages(16))
    backend.import_vm("staged", mem)
    backend.import_vm("live", mem)
    backend.start("live", 0)
    freed = backend.purge("gone")
    assert freed >= 64 * PAGE_SIZE and not (tmp_path / "vms" / "gone").exists()
    with pytest.raises(VmError, match="'live' is running here, not retained"):
        backend.purge("live")
    with pytest.raises(VmError, match="'staged' is stopped here"):
        backend.purge("staged")
    assert backend.purge("staged", staged=True) > 0  # an import never registered
    with pytest.raises(VmError, match="no VM 'gone'"):
        backend.purge("gone")
    assert backend.purged == {"purge": (1, freed), "staged": (1, backend.purged["staged"][1])}
    assert [v.name for v in backend.list_vms()] == ["live"]


@given(st.lists(st.tuples(st.sampled_from(list(VmState)), st.integers(0, 1 << 30),
                          st.floats(0, 1e9)), max_size=12),
       st.integers(0, 1 << 32))
def test_evictions_fit_the_budget_and_take_only_the_oldest(
        held: list[tuple[VmState, int, float]], budget: int) -> None:
    usage = [VmUsage(f"vm{i}", s, b, t) for i, (s, b, t) in enumerate(held)]
    gone = evictions(usage, budget)
    kept = [u for u in usage if u.retained and u.name not in gone]
    assert sum(u.disk_bytes for u in kept) <= budget
    assert all(u.retained for u in usage if u.name in gone)
    removed = [u for u in usage if u.name in gone]
    if removed and kept:  # nothing kept is older than anything removed
        assert max((u.retired_at, u.name) for u in removed) < min(
            (u.retired_at, u.name) for u in kept)
    if gone:  # and no more than needed: without the last one removed, it would not fit
        last = next(u for u in usage if u.name == gone[-1])
        assert sum(u.disk_bytes for u in kept) + last.disk_bytes > budget


def test_sizes_parse_with_binary_units() -> None:
    assert parse_size("20GiB") == 20 << 30 and parse_size("512 MiB") == 512 << 20
    assert parse_size("1048576") == 1 << 20 and parse_size("3k") == 3072
    for bad in ("", "GiB", "1.5GiB", "-1", "10 parsecs"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_usage_counts_allocated_bytes(tmp_path: Path) -> None:
    backend = ImageBackend(tmp_path / "vms", seal_key=KEY)
    writers = backend.prepare_incoming("sparse", [("memory", 1 << 14)], "m1")  # 64 MiB
    for w in writers.values():
        w.close()
    (u,) = backend.usage()
    assert u.name == "sparse" and u.state is VmState.INCOMING
    assert u.disk_bytes < 2 << 20  # its entries and metadata, not 64 MiB of holes
    assert os.stat(tmp_path / "vms" / "sparse" / "memory.img").st_size > 64 << 20


# --------------------------------------------------------------------- the qemu backend


def test_qemu_retained_copies_are_sealed_and_unsealed_for_a_migration_back(
        tmp_path: Path) -> None:
    """No guest boots here: a qemu VM arrives (prepare_incoming), its migration aborts
    (discard_incoming: a retained copy, QEMU off), then it comes back."""
    from federation.vms.qemu_backend import RETAINED, QemuBackend
    from federation.vms.qemu_spec import VmSpec

    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    spec = VmSpec(str(kernel), str(initrd), 16)
    layout = [("memory", 16 * 256), ("disk-0", 64)]
    root = tmp_path / "qemu"
    backend = QemuBackend(root, accel="tcg", seal_key=KEY)
    writers = backend.prepare_incoming("g", layout, "m1", spec.to_json())
    secret = b"guest secret page " * 228  # one page: 4,104 bytes cut to 4,096
    writers["memory"].write(5, secret[:PAGE_SIZE])
    writers["disk-0"].write(7, secret[:PAGE_SIZE])
    for w in writers.values():
        w.close()
    backend.discard_incoming("g", "m1")
    assert backend.info("g").state is VmState.RETIRED
    assert not backend.ram_path("g").exists() and not (root / "g" / "disk-0.img").exists()
    stored = b"".join(p.read_bytes() for p in root.rglob("*.img"))
    assert secret[:64] not in stored  # the RAM and the disk are sealed
    images = backend.open_images("g")
    assert bytes(images["memory"].view(5)) == secret[:PAGE_SIZE]
    assert bytes(images["disk-0"].view(7)) == secret[:PAGE_SIZE]
    for img in images.values():
        img.close()
    # a crash after the seal but before the plain files went: the next backend drops them
    backend.ram_path("g").write_bytes(bytes(PAGE_SIZE))
    QemuBackend(root, accel="tcg", seal_key=KEY)
    assert not backend.ram_path("g").exists()
    # the VM comes back: plain images again for QEMU, with the retained pages in them
    writers = backend.prepare_incoming("g", layout, "m2", spec.to_json())
    assert not (root / "g" / RETAINED).exists()
    assert backend.ram_path("g").read_bytes()[5 * PAGE_SIZE: 6 * PAGE_SIZE] == \
        secret[:PAGE_SIZE]
    for w in writers.values():
        w.close()


def test_the_target_publishes_its_sealed_copy_before_it_reports_the_root(
        tmp_path: Path) -> None:
    """The ledger commits on the root the target reports, and the source then retires
    its copy: the sealed incoming images must be in their files by then, not only in
    the writer (a crash right after the report keeps the verified copy)."""
    from federation.migration.round_events import WriteChunk
    from federation.migration.vocabulary import PrepareIncoming, TargetVerified, Verify
    from federation.vms.actions import VmActions

    backend = ImageBackend(tmp_path / "vms", seal_key=KEY)
    actions = VmActions(backend)
    assert actions.carry_out(PrepareIncoming("web", "m1", (("memory", 64),), 1)) == []
    data = real_pages(64)
    for first in range(0, 64, 16):
        reply = actions.carry_out_pages(WriteChunk(
            "dc1", "m1", 1, first, "memory", first,
            data[first * PAGE_SIZE: (first + 16) * PAGE_SIZE]))
        assert reply[0].error == ""
    (verified,) = actions.carry_out(Verify("web", "m1"))
    assert isinstance(verified, TargetVerified)
    # what a restarted node would read: the published file, opened afresh
    fresh = ImageBackend(tmp_path / "vms", seal_key=KEY)
    img = fresh.open_images("web")["memory"]
    assert bytes(img.view(0, 64)) == data
    img.close()


def test_a_vm_with_an_unreadable_meta_never_stops_the_backend(tmp_path: Path) -> None:
    backend = ImageBackend(tmp_path / "vms", seal_key=KEY, retain_bytes=0)
    retire(backend, "gone", [("memory", 16)], b"g")  # removed at once: the budget is 0
    (tmp_path / "vms" / "bad").mkdir()
    (tmp_path / "vms" / "bad" / "meta.json").write_text("{not json")
    again = ImageBackend(tmp_path / "vms", seal_key=KEY, retain_bytes=0)
    assert [u.name for u in again.usage()] == []
    assert (tmp_path / "vms" / "bad").exists()  # left for the operator to see
