"""At-rest sealing (issue 15 item 6): the chunk format, sealed files, tampering, crashes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.vms import sealed_image
from federation.vms.at_rest_key import AtRestKeyError, load_key, load_or_create
from federation.vms.sealed_image import (
    SealedImage,
    SealedWriter,
    create_sealed,
    is_sealed,
    seal_file,
)
from federation.vms.sealing import (
    ENTRY_SIZE,
    HEADER_SIZE,
    NONCE_SIZE,
    SealError,
    SealHeader,
    SealKey,
    decode_header,
    is_zero_entry,
    open_chunk,
    seal_chunk,
    zero_entry,
)
from mesh.hde.image import PAGE_SIZE, ImageError
from mesh.hde.index import build_index

KEY = SealKey(bytes(range(32)))
OTHER = SealKey(bytes(32))


def pages(n: int, salt: int = 0) -> bytes:
    """``n`` distinct, recognisable pages."""
    return b"".join((f"page {i} salt {salt} ".encode() * 300)[:PAGE_SIZE] for i in range(n))


def sealed(tmp_path: Path, n: int = 40, salt: int = 0) -> tuple[Path, bytes]:
    plain = pages(n, salt)
    src = tmp_path / f"plain{salt}.img"
    src.write_bytes(plain)
    dst = tmp_path / f"sealed{salt}.img"
    assert seal_file(src, dst, KEY) == n
    return dst, plain


def read_all(path: Path, key: SealKey = KEY) -> bytes:
    img = SealedImage(path, key)
    try:
        return bytes(img.view(0, img.page_count))
    finally:
        img.close()


# --------------------------------------------------------------------- the format


def test_chunk_round_trip_and_position_binding() -> None:
    h = SealHeader(40, b"f" * 16, KEY.key_id)
    plain = pages(16)
    entry, data = seal_chunk(KEY, h, 1, plain, b"n" * NONCE_SIZE)
    assert len(entry) == ENTRY_SIZE and len(data) == len(plain) and data != plain
    assert open_chunk(KEY, h, 1, entry, data) == plain
    with pytest.raises(SealError, match="chunk 0 .* fails authentication"):
        open_chunk(KEY, h, 0, entry, data)  # moved to another position
    other_file = SealHeader(40, b"g" * 16, KEY.key_id)
    with pytest.raises(SealError, match="fails authentication"):
        open_chunk(KEY, other_file, 1, entry, data)  # into another file
    with pytest.raises(SealError, match="expected"):
        open_chunk(KEY, h, 2, entry, data)  # the last chunk is 8 pages: wrong length


def test_zero_entries_are_bound_like_chunks() -> None:
    h = SealHeader(40, b"f" * 16, KEY.key_id)
    zero = zero_entry(KEY, h, 1, b"z" * NONCE_SIZE)
    assert is_zero_entry(KEY, h, 1, zero)
    assert open_chunk(KEY, h, 1, zero, b"") == bytes(16 * PAGE_SIZE)
    assert not is_zero_entry(KEY, h, 0, zero)  # another position
    assert not is_zero_entry(KEY, SealHeader(40, b"g" * 16, KEY.key_id), 1, zero)
    assert not is_zero_entry(KEY, h, 1, bytes(ENTRY_SIZE))  # an entry zeroed by hand
    with pytest.raises(SealError, match="fails authentication|expected"):
        open_chunk(KEY, h, 1, bytes(ENTRY_SIZE), bytes(16 * PAGE_SIZE))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=HEADER_SIZE + 8), st.one_of(st.none(), st.integers(0, 1 << 50)))
def test_header_decoder_refuses_garbage_with_seal_error(raw: bytes, size: int | None) -> None:
    try:
        h = decode_header(raw, KEY, size)
    except SealError:
        return
    assert h.encode() == raw[:HEADER_SIZE]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1 << 40), st.integers(1, 256), st.binary(min_size=16, max_size=16))
def test_header_round_trip(page_count: int, chunk_pages: int, file_id: bytes) -> None:
    h = SealHeader(page_count, file_id, KEY.key_id, chunk_pages)
    assert decode_header(h.encode(), KEY, h.file_size) == h
    with pytest.raises(SealError, match="truncated or extended"):
        decode_header(h.encode(), KEY, h.file_size - 1)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=ENTRY_SIZE + 8), st.binary(max_size=17 * PAGE_SIZE),
       st.integers(-2, 4))
def test_chunk_decoder_refuses_garbage_with_seal_error(entry: bytes, data: bytes,
                                                      index: int) -> None:
    h = SealHeader(40, b"f" * 16, KEY.key_id)
    with pytest.raises(SealError):
        open_chunk(KEY, h, index, entry, data)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 16 * PAGE_SIZE + ENTRY_SIZE - 1), st.integers(1, 255))
def test_every_flipped_byte_of_a_chunk_is_refused(offset: int, mask: int) -> None:
    h = SealHeader(16, b"f" * 16, KEY.key_id)
    entry, data = seal_chunk(KEY, h, 0, pages(16), b"n" * NONCE_SIZE)
    raw = bytearray(entry + data)
    raw[offset] ^= mask
    with pytest.raises(SealError, match="fails authentication"):
        open_chunk(KEY, h, 0, raw[:ENTRY_SIZE], raw[ENTRY_SIZE:])


def test_header_names_a_foreign_key_and_non_sealed_files(tmp_path: Path) -> None:
    path, _ = sealed(tmp_path)
    with pytest.raises(SealError, match=f"at-rest key {KEY.key_id.hex()}, this node's key is"):
        SealedImage(path, OTHER)
    plain = tmp_path / "plain0.img"
    with pytest.raises(SealError, match="not a sealed image"):
        SealedImage(plain, KEY)
    assert is_sealed(path) and not is_sealed(plain)


# --------------------------------------------------------------------- sealed files


def test_sealed_file_reads_back_every_range_and_reveals_no_page(tmp_path: Path) -> None:
    path, plain = sealed(tmp_path, 41)  # 41 pages: the last chunk holds 9
    img = SealedImage(path, KEY, "vm/memory")
    try:
        assert img.page_count == 41 and img.nbytes == 41 * PAGE_SIZE
        for first, count in [(0, 1), (15, 2), (3, 30), (40, 1), (0, 41), (16, 16)]:
            assert bytes(img.view(first, count)) == plain[first * PAGE_SIZE:
                                                          (first + count) * PAGE_SIZE]
        with pytest.raises(ImageError, match="outside"):
            img.view(40, 2)
        raw = path.read_bytes()
        for i in range(41):  # a stolen copy of the file: no page, no piece of one
            assert plain[i * PAGE_SIZE: i * PAGE_SIZE + 64] not in raw
        # HDE indexes a sealed image as it indexes the plain one
        assert build_index(img).root == build_index(_plain_image(plain)).root
    finally:
        img.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _plain_image(data: bytes):  # type: ignore[no-untyped-def]
    from mesh.hde.image import Image
    return Image(data)


@pytest.mark.parametrize("damage", ["flip", "swap", "swap-entries", "zero-entry",
                                    "truncate", "extend", "header"])
def test_tampered_files_are_refused_with_a_clear_error(tmp_path: Path, damage: str) -> None:
    path, _ = sealed(tmp_path, 48)
    h = SealHeader(48, b"x" * 16, KEY.key_id)
    raw = bytearray(path.read_bytes())
    c = 16 * PAGE_SIZE
    d0, d1 = h.chunk_offset(0), h.chunk_offset(1)
    e0, e1 = h.entry_offset(0), h.entry_offset(1)
    if damage == "flip":
        raw[d1 + 100] ^= 1
        match = "chunk 1 .*fails authentication"
    elif damage == "swap":  # two chunks' data and entries, exchanged
        raw[d0:d0 + c], raw[d1:d1 + c] = raw[d1:d1 + c], raw[d0:d0 + c]
        raw[e0:e0 + ENTRY_SIZE], raw[e1:e1 + ENTRY_SIZE] = (raw[e1:e1 + ENTRY_SIZE],
                                                            raw[e0:e0 + ENTRY_SIZE])
        match = "chunk 0 .*fails authentication"
    elif damage == "swap-entries":
        raw[e0:e0 + ENTRY_SIZE], raw[e1:e1 + ENTRY_SIZE] = (raw[e1:e1 + ENTRY_SIZE],
                                                            raw[e0:e0 + ENTRY_SIZE])
        match = "chunk 0 .*fails authentication"
    elif damage == "zero-entry":  # "this chunk is zero pages", forged by zeroing
        raw[e0:e0 + ENTRY_SIZE] = bytes(ENTRY_SIZE)
        match = "chunk 0 .*fails authentication"
    elif damage == "truncate":
        del raw[-1:]
        match = "truncated or extended"
    elif damage == "extend":
        raw += bytes(PAGE_SIZE)
        match = "truncated or extended"
    else:
        raw[20] ^= 0x80  # page count: a header changed in any byte fails every chunk
        match = "truncated or extended|fails authentication"
    path.write_bytes(bytes(raw))
    with pytest.raises(SealError, match=match):
        read_all(path)


def test_a_chunk_copied_from_another_sealed_file_is_refused(tmp_path: Path) -> None:
    a, _ = sealed(tmp_path, 32, salt=1)
    b, _ = sealed(tmp_path, 32, salt=2)
    h = SealHeader(32, b"x" * 16, KEY.key_id)
    raw_a, raw_b = bytearray(a.read_bytes()), b.read_bytes()
    e, d, c = h.entry_offset(0), h.chunk_offset(0), 16 * PAGE_SIZE
    raw_a[e:e + ENTRY_SIZE] = raw_b[e:e + ENTRY_SIZE]
    raw_a[d:d + c] = raw_b[d:d + c]
    a.write_bytes(bytes(raw_a))
    with pytest.raises(SealError, match="chunk 0 .*fails authentication"):
        read_all(a)


# --------------------------------------------------------------------- the writer


def test_writer_publishes_atomically_and_keeps_the_old_file_until_then(tmp_path: Path) -> None:
    path, plain = sealed(tmp_path, 40)
    w = SealedWriter(path, KEY, 40, "vm/memory")
    w.write(3, b"\x07" * PAGE_SIZE)
    w.fill(16, 16, 0xAB)  # a whole chunk: written without reading the old one
    w.copy(w, 0, 39, 1)
    assert bytes(w.view(3)) == b"\x07" * PAGE_SIZE  # the writer reads its own writes
    assert read_all(path) == plain  # nothing published yet: the old file, whole
    w.flush()
    want = bytearray(plain)
    want[3 * PAGE_SIZE: 4 * PAGE_SIZE] = b"\x07" * PAGE_SIZE
    want[16 * PAGE_SIZE: 32 * PAGE_SIZE] = b"\xab" * (16 * PAGE_SIZE)
    want[39 * PAGE_SIZE:] = plain[:PAGE_SIZE]
    assert read_all(path) == bytes(want)
    w.write(0, b"\x01" * PAGE_SIZE)  # a write after a publish makes a new work copy
    assert read_all(path) == bytes(want)
    w.close()
    want[:PAGE_SIZE] = b"\x01" * PAGE_SIZE
    assert read_all(path) == bytes(want)
    assert not (tmp_path / "sealed0.img.new").exists()


def test_a_crash_before_the_rename_leaves_the_old_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path, plain = sealed(tmp_path, 40)
    w = SealedWriter(path, KEY, 40)
    for p in range(0, 40, 3):
        w.write(p, b"\xee" * PAGE_SIZE)

    def crash(src: object, dst: object) -> None:
        raise OSError("power lost")

    monkeypatch.setattr(sealed_image.os, "replace", crash)
    with pytest.raises(OSError, match="power lost"):
        w.flush()
    monkeypatch.undo()
    assert read_all(path) == plain  # the old file, every chunk of it
    # the next writer starts again from the published file, the leftover is overwritten
    w2 = SealedWriter(path, KEY, 40)
    assert bytes(w2.view(0, 40)) == plain
    w2.write(1, b"\x02" * PAGE_SIZE)
    w2.close()
    assert read_all(path)[PAGE_SIZE: 2 * PAGE_SIZE] == b"\x02" * PAGE_SIZE


def test_a_torn_work_copy_never_reaches_the_published_file(tmp_path: Path) -> None:
    """A process killed while the work copy was being written: the published file is
    untouched, and the torn copy is not read (it is remade from the published file)."""
    n = 16 * 70  # more chunks than the writer holds: some reach the work copy
    path, plain = sealed(tmp_path, n)
    w = SealedWriter(path, KEY, n)
    w.fill(0, n, 0x33)
    work = tmp_path / "sealed0.img.new"
    raw = bytearray(work.read_bytes())
    raw[HEADER_SIZE + 50: HEADER_SIZE + 4000] = bytes(3950)  # torn entries
    raw[-5000:-100] = bytes(4900)  # and torn data
    work.write_bytes(bytes(raw))
    assert read_all(path) == plain
    w2 = SealedWriter(path, KEY, n)
    assert bytes(w2.view(0, n)) == plain
    w2.close()


def test_writer_creates_and_resizes(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    w = SealedWriter(path, KEY, 20)
    assert path.exists() and read_all(path) == bytes(20 * PAGE_SIZE)  # published at once
    w.write(19, b"\x05" * PAGE_SIZE)
    w.close()
    grown = SealedWriter(path, KEY, 36)  # pages kept, zeros after
    assert bytes(grown.view(19)) == b"\x05" * PAGE_SIZE
    assert bytes(grown.view(20, 16)) == bytes(16 * PAGE_SIZE)
    grown.close()
    shrunk = SealedWriter(path, KEY, 10)
    shrunk.close()
    assert read_all(path) == bytes(10 * PAGE_SIZE)
    create_sealed(tmp_path / "z.img", KEY, 3)
    assert read_all(tmp_path / "z.img") == bytes(3 * PAGE_SIZE)


def test_seal_file_refuses_partial_pages(tmp_path: Path) -> None:
    src = tmp_path / "odd.img"
    src.write_bytes(b"x" * (PAGE_SIZE + 1))
    with pytest.raises(ImageError, match="not a positive number"):
        seal_file(src, tmp_path / "out.img", KEY)
    assert not (tmp_path / "out.img").exists()
    assert not (tmp_path / "out.img.sealing").exists()


# --------------------------------------------------------------------- the key file


def test_key_file_is_made_once_0600_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "dc1.at-rest"
    key, made = load_or_create(path, store_has_images=False)
    assert made and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, made = load_or_create(path, store_has_images=True)
    assert again == key and not made
    os.chmod(path, 0o644)
    with pytest.raises(AtRestKeyError, match="chmod 600"):
        load_key(path)
    path.unlink()
    with pytest.raises(AtRestKeyError, match="restore the key file"):
        load_or_create(path, store_has_images=True)
    path.write_text("dwcp-at-rest:AAAA\n")
    os.chmod(path, 0o600)
    with pytest.raises(AtRestKeyError, match="3 bytes, expected 32"):
        load_key(path)


def test_a_scratch_writer_writes_in_place_under_its_key(tmp_path: Path) -> None:
    """A migration source's shadow: sealed under a key only the process holds, written
    in place (no work copy), readable through the writer at once."""
    path = tmp_path / "shadow.img"
    w = SealedWriter(path, KEY, 16 * 70, "shadow/memory", scratch=True)
    data = pages(16 * 70, salt=9)
    w.write(0, data)
    assert bytes(w.view(0, 16 * 70)) == data
    w.flush()
    assert not (tmp_path / "shadow.img.new").exists()
    assert read_all(path) == data  # in place
    assert data[:64] not in path.read_bytes()
    w.close()


def test_threads_index_a_sealed_writer_as_they_index_its_plain_pages(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mesh.hde.image import Image

    n = 16 * 300  # more chunks than any cache: the threads decrypt in parallel
    data = pages(n, salt=3)
    w = SealedWriter(tmp_path / "w.img", KEY, n, "w")
    w.write(0, data)
    w.fill(100, 40, 0)  # some of it still dirty, some in the work copy
    want = bytearray(data)
    want[100 * PAGE_SIZE: 140 * PAGE_SIZE] = bytes(40 * PAGE_SIZE)
    with ThreadPoolExecutor(2) as ex:
        assert build_index(w, ex).root == build_index(Image(bytes(want))).root
    w.close()
    with ThreadPoolExecutor(2) as ex:
        img = SealedImage(tmp_path / "w.img", KEY)
        assert build_index(img, ex).root == build_index(Image(bytes(want))).root
        img.close()
