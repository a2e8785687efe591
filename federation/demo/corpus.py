"""The corpus of real VM state (docs/CORPUS.md): ``dwcp demo`` migrates a corpus guest
when one is built, and the data-plane benchmarks run on it.

``make corpus`` builds it outside git, in ``$DWCP_CORPUS`` (default
``~/.cache/dwcp-corpus``), and lists every file in ``manifest.json``. This module
finds the corpus and reads its manifest; ``bench.corpus.build`` writes both (the reader
is here, in the product, because the demo needs it: nothing in the product imports
``bench``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
KINDS = ("ram", "disk", "kernel", "initramfs", "deb", "log", "record")


class ManifestError(Exception):
    """The manifest is missing, malformed, or names a file that does not match it."""


def corpus_dir() -> Path:
    """Where the corpus lives: ``$DWCP_CORPUS`` or ``~/.cache/dwcp-corpus``."""
    env = os.environ.get("DWCP_CORPUS")
    return Path(env) if env else Path.home() / ".cache" / "dwcp-corpus"


@attrs.frozen
class ManifestEntry:
    """One corpus file: its path relative to the corpus directory and what it is."""

    path: str
    size: int
    sha256: str
    kind: str
    what: str
    meta: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Manifest:
    root: Path
    entries: tuple[ManifestEntry, ...]
    info: Mapping[str, Any]

    def __iter__(self) -> Iterator[ManifestEntry]:
        return iter(self.entries)

    def path(self, entry: ManifestEntry) -> Path:
        return self.root / entry.path

    def find(self, kind: str, **meta: Any) -> list[ManifestEntry]:
        """Entries of ``kind`` whose meta has every given key equal to the given value."""
        return [
            e
            for e in self.entries
            if e.kind == kind and all(e.meta.get(k) == v for k, v in meta.items())
        ]

    def one(self, kind: str, **meta: Any) -> ManifestEntry:
        found = self.find(kind, **meta)
        if len(found) != 1:
            raise ManifestError(
                f"{self.root / MANIFEST_NAME}: expected one {kind} file with {meta}, "
                f"found {len(found)} (run `make corpus`, see docs/CORPUS.md)"
            )
        return found[0]

    def ram(self, guest_mib: int, workload: str, offset_s: int) -> Path:
        """The RAM snapshot of a guest at t0 + offset_s (docs/CORPUS.md)."""
        return self.path(self.one("ram", guest_mib=guest_mib, workload=workload, offset_s=offset_s))


def _entry(item: object, where: str) -> ManifestEntry:
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: expected an object, got {type(item).__name__}")
    fields: dict[str, type] = {"path": str, "size": int, "sha256": str, "kind": str, "what": str}
    for name, typ in fields.items():
        value = item.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ManifestError(f"{where}.{name}: expected {typ.__name__}, got {value!r}")
    path = item["path"]
    if path.startswith("/") or ".." in Path(path).parts or not path:
        raise ManifestError(f"{where}.path: must be relative inside the corpus, got {path!r}")
    if item["size"] < 0:
        raise ManifestError(f"{where}.size: negative size {item['size']}")
    digest = item["sha256"]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits, got {digest!r}")
    if item["kind"] not in KINDS:
        raise ManifestError(f"{where}.kind: unknown kind {item['kind']!r}, expected one of {KINDS}")
    meta = item.get("meta", {})
    if not isinstance(meta, dict):
        raise ManifestError(f"{where}.meta: expected an object, got {type(meta).__name__}")
    return ManifestEntry(path, item["size"], digest, item["kind"], item["what"], meta)


def parse_manifest(text: str, root: Path) -> Manifest:
    """Parse manifest JSON; every error is a ManifestError naming the field."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest: not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest: expected a JSON object at the top level")
    if doc.get("format") != MANIFEST_FORMAT:
        got = doc.get("format")
        raise ManifestError(f"manifest.format: expected {MANIFEST_FORMAT}, got {got!r}")
    files = doc.get("files")
    if not isinstance(files, list):
        raise ManifestError("manifest.files: expected a list")
    entries = tuple(_entry(item, f"manifest.files[{i}]") for i, item in enumerate(files))
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            raise ManifestError(f"manifest.files: {e.path!r} listed twice")
        seen.add(e.path)
    info = doc.get("info", {})
    if not isinstance(info, dict):
        raise ManifestError("manifest.info: expected an object")
    return Manifest(root, entries, info)


def load_manifest(root: Path | None = None, check_sizes: bool = True) -> Manifest:
    """Read ``manifest.json`` of the corpus at ``root`` (default ``corpus_dir()``)."""
    root = corpus_dir() if root is None else root
    path = root / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no corpus manifest (run `make corpus`)") from None
    manifest = parse_manifest(text, root)
    if check_sizes:
        for e in manifest.entries:
            try:
                size = (root / e.path).stat().st_size
            except FileNotFoundError:
                raise ManifestError(f"{root / e.path}: in the manifest but missing") from None
            if size != e.size:
                raise ManifestError(f"{root / e.path}: size {size}, manifest says {e.size}")
    return manifest
