"""The corpus manifest, the sparse snapshot copy, and the byte-counting relay."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.corpus.build import describe, write_manifest
from bench.corpus.guest import COPY_BLOCK, copy_sparse
from bench.corpus.relay import CountingRelay
from federation.demo.corpus import ManifestError, corpus_dir, load_manifest, parse_manifest

REAL_FILE = Path(socket.__file__)  # real bytes (this Python's socket.py), never random


def entry(path: str = "ram/1024m-A-t60.raw", **over: object) -> dict[str, object]:
    e: dict[str, object] = {"path": path, "size": 4096, "sha256": "ab" * 32, "kind": "ram",
                            "what": "guest RAM", "meta": {"guest_mib": 1024, "workload": "A",
                                                          "offset_s": 60}}  # fmt: skip
    e.update(over)
    return e


def doc(*files: dict[str, object]) -> str:
    return json.dumps({"format": 1, "info": {}, "files": list(files)})


def test_manifest_finds_a_ram_snapshot(tmp_path: Path) -> None:
    m = parse_manifest(doc(entry(), entry("ram/1024m-B-t60.raw", meta={"workload": "B"})),
                       tmp_path)  # fmt: skip
    assert m.ram(1024, "A", 60) == tmp_path / "ram/1024m-A-t60.raw"
    assert [e.path for e in m.find("ram", workload="B")] == ["ram/1024m-B-t60.raw"]
    with pytest.raises(ManifestError, match="expected one ram file"):
        m.ram(256, "A", 60)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (entry(size=-1), "size"),
        (entry(size="4096"), "size"),
        (entry(sha256="AB" * 32), "sha256"),
        (entry(path="../etc/passwd"), "path"),
        (entry(path="/etc/passwd"), "path"),
        (entry(kind="mystery"), "kind"),
        (entry(meta=[1]), "meta"),
    ],
)
def test_manifest_rejects_a_bad_field_by_name(bad: dict[str, object], field: str) -> None:
    with pytest.raises(ManifestError, match=rf"files\[0\]\.{field}"):
        parse_manifest(doc(bad), Path("/corpus"))


def test_manifest_rejects_a_duplicate_and_a_wrong_format() -> None:
    with pytest.raises(ManifestError, match="listed twice"):
        parse_manifest(doc(entry(), entry()), Path("/c"))
    with pytest.raises(ManifestError, match="manifest.format"):
        parse_manifest(json.dumps({"format": 2, "files": []}), Path("/c"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),  # fmt: skip
    max_leaves=12,
)


@given(st.one_of(st.text(max_size=40), json_values.map(json.dumps),
                 st.builds(lambda f: doc(f), st.dictionaries(
                     st.sampled_from(["path", "size", "sha256", "kind", "what", "meta"]),
                     json_values)))) # fmt: skip
def test_manifest_parser_raises_only_manifest_error(text: str) -> None:
    try:
        parse_manifest(text, Path("/c"))
    except ManifestError:
        pass


def test_written_manifest_lists_sizes_and_digests(tmp_path: Path) -> None:
    (tmp_path / "ram").mkdir()
    image = tmp_path / "ram" / "256m-A-t0.raw"
    image.write_bytes(REAL_FILE.read_bytes())
    write_manifest(tmp_path, {"packages": {}})
    m = load_manifest(tmp_path)
    (e,) = m.entries
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert (e.size, e.sha256) == (image.stat().st_size, digest)
    assert e.meta == {"guest_mib": 256, "workload": "A", "offset_s": 0}
    image.write_bytes(b"shorter")
    with pytest.raises(ManifestError, match="size 7"):
        load_manifest(tmp_path)


def test_corpus_file_kinds_come_from_their_paths() -> None:
    info = {"packages": {"tzdata": ["2026b", "2026f"]}, "kernel": {"package": "k", "version": "1"}}
    assert describe("disk/v2.ext4", info)[2] == {"version": "v2", "packages": {"tzdata": "2026f"}}
    assert describe("ram/1024m-B-t60.raw", info)[0] == "ram"
    with pytest.raises(ValueError, match="not a corpus file"):
        describe("stray.txt", info)


def test_corpus_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_CORPUS", "/somewhere/else")
    assert corpus_dir() == Path("/somewhere/else")
    monkeypatch.delenv("DWCP_CORPUS")
    assert corpus_dir() == Path.home() / ".cache" / "dwcp-corpus"


def test_sparse_copy_is_identical_and_leaves_zero_blocks_as_holes(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    data = REAL_FILE.read_bytes()
    first = data + bytes(COPY_BLOCK - len(data) % COPY_BLOCK)  # ends on a block boundary
    src.write_bytes(first + bytes(4 * COPY_BLOCK) + data + bytes(100))
    dst = tmp_path / "copy"
    copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    slack = 65536  # file-system block rounding and extent-tree blocks
    assert dst.stat().st_blocks * 512 <= src.stat().st_size - 4 * COPY_BLOCK + slack


def _serve(server: socket.socket, replies: dict[int, bytes], n: int) -> None:
    """Accept n connections; answer each with the sha256 of what it sent, 1000 times."""
    for i in range(n):
        conn, _ = server.accept()
        with conn:
            h = hashlib.sha256()
            while data := conn.recv(65536):
                h.update(data)
            reply = h.digest() * 1000
            replies[i] = reply
            conn.sendall(reply)


def test_relay_counts_every_byte_exactly_both_ways() -> None:
    payload = REAL_FILE.read_bytes()
    sizes = [0, 1, len(payload), 3 * len(payload) + 17]
    replies: dict[int, bytes] = {}
    with socket.create_server(("127.0.0.1", 0)) as server:
        t = threading.Thread(target=_serve, args=(server, replies, len(sizes)))
        t.start()
        with CountingRelay(server.getsockname()[:2]) as relay:
            for size in sizes:
                sent = (payload * (size // max(len(payload), 1) + 1))[:size]
                with socket.create_connection(relay.address) as c:
                    c.sendall(sent)
                    c.shutdown(socket.SHUT_WR)
                    got = b""
                    while data := c.recv(65536):
                        got += data
                assert got == hashlib.sha256(sent).digest() * 1000
            assert relay.wait_drained(10)
            t.join(10)
            assert relay.forward_bytes == sum(sizes)
            assert relay.backward_bytes == sum(len(r) for r in replies.values())
            assert relay.connections == len(sizes)
            assert relay.errors == []
