"""Hostile imports and a node's files (issue 15 items 5, 7): a node reads VM images only
under its import directories, whatever path an operator's request names (``..``, a
symlink out, an absolute path elsewhere, a symlink swapped in mid-way, a FIFO), and says
nothing about whether a path outside exists; a VM's files are 0600 in 0700 directories
and the data directory is 0700."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from federation.node.errors import NodeError
from federation.node.imports import ImportDirs, ImportRefused
from federation.node.private_dir import private_dir
from federation.vms.image_backend import ImageBackend
from mesh.runtime.log import JsonLog

PAGE = 4096


def _image(path: Path, pages: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(pages * PAGE))
    return path


def _refused(dirs: ImportDirs, text: str) -> str:
    with pytest.raises(ImportRefused) as err:
        os.close(dirs.open("memory", text))
    return str(err.value)


def test_only_regular_files_under_the_import_directories(tmp_path: Path,
                                                         monkeypatch: Any) -> None:
    root = tmp_path / "images"
    inside = _image(root / "vm" / "memory.img")
    secret = _image(tmp_path / "secret" / "key.img")
    os.symlink(secret, root / "out.img")  # a symlink out of the import directory
    os.symlink(inside, root / "alias.img")  # ... and one that stays inside
    os.symlink(tmp_path / "secret", root / "sub")  # a directory symlink out
    os.mkfifo(root / "pipe.img")
    dirs = ImportDirs([root])

    fd = dirs.open("memory", str(inside))
    assert os.read(fd, 16) == inside.read_bytes()[:16]
    os.close(fd)
    os.close(dirs.open("memory", str(root / "alias.img")))

    generic = "is not a file under this node's import directories"
    for text in (str(root / "vm" / ".." / ".." / "secret" / "key.img"),  # ..
                 str(root / "out.img"), str(root / "sub" / "key.img"),  # symlinks out
                 str(secret),  # an absolute path elsewhere that exists
                 str(tmp_path / "secret" / "nope.img"),  # ... and one that does not
                 "/etc/shadow", "/proc/self/environ", "/dev/zero",
                 "vm/memory.img",  # relative
                 str(root / "pipe.img"), str(root / "vm"), str(root)):
        why = _refused(dirs, text)
        assert generic in why, why
    # outside, existing or not: the same words (nothing tells which)
    a = _refused(dirs, str(secret)).replace(str(secret), "P")
    b = _refused(dirs, str(tmp_path / "secret" / "nope.img")).replace(
        str(tmp_path / "secret" / "nope.img"), "P")
    assert a == b
    # inside, a missing file may say so (the operator can list the directory anyway)
    assert "no such file" in _refused(dirs, str(root / "vm" / "disk.img"))

    # a symlink swapped in after the check: the walk with O_NOFOLLOW refuses it
    monkeypatch.setattr(os.path, "realpath", lambda p: os.fspath(p))
    assert generic in _refused(dirs, str(root / "sub" / "key.img"))
    assert generic in _refused(dirs, str(root / "out.img"))


def test_import_directories_must_not_be_world_writable(tmp_path: Path) -> None:
    open_dir = tmp_path / "drop"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(NodeError, match="writable by every user"):
        ImportDirs([open_dir])
    with pytest.raises(NodeError, match="import directory .*: not a directory"):
        ImportDirs([_image(tmp_path / "f.img")])
    assert "no such" in str(pytest.raises(NodeError, ImportDirs, [tmp_path / "nope"]).value).lower()


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_vms_files_are_its_owners_alone(tmp_path: Path) -> None:
    old = os.umask(0)  # the modes are the backend's own, not the umask's
    try:
        backend = ImageBackend(tmp_path / "vms")
        backend.import_vm("web", _image(tmp_path / "src" / "m.img"),
                          [_image(tmp_path / "src" / "d.img")])
        writers = backend.prepare_incoming("db", [("memory", 3)], "m1")
        for w in writers.values():
            w.close()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "vms") == 0o700
    for vm in ("web", "db"):
        assert _mode(tmp_path / "vms" / vm) == 0o700
        files = sorted((tmp_path / "vms" / vm).iterdir())
        assert files and all(_mode(f) == 0o600 for f in files), \
            {f.name: oct(_mode(f)) for f in files}


def test_the_data_directory_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    out = io.StringIO()
    private_dir(data, JsonLog("dc1", out))
    assert _mode(data) == 0o700
    event = json.loads(out.getvalue().splitlines()[-1])
    assert (event["event"], event["was"], event["now"]) == ("data_dir_mode_fixed", "755", "700")
    private_dir(tmp_path / "new" / "dc1")
    assert _mode(tmp_path / "new" / "dc1") == 0o700
    if os.getuid() != 0:
        pytest.skip("needs root to give a directory to another user (chown)")
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(NodeError, match="belongs to uid 65534"):
        private_dir(other)
