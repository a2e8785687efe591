"""The node's data directory is its own: mode 0700, owned by the node's user.

It holds the ledger, the VM images and retained copies: nobody else on the machine may
list or read it. At start the node creates it 0700, tightens a directory of its own
that is open to others (and logs that it did), and refuses one owned by another user
(someone else could swap its contents).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from federation.node.errors import NodeError
from mesh.runtime.log import JsonLog

__all__ = ["private_dir", "PRIVATE_MODE"]

#: Owner only: rwx------.
PRIVATE_MODE = 0o700


def private_dir(path: Path, log: JsonLog | None = None) -> None:
    """Create ``path`` (and its parents) 0700, or make an existing one 0700; raises
    NodeError for a directory of another user or a path that is not a directory."""
    path.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NodeError(f"data directory {path}: not a directory")
    if st.st_uid != os.getuid():
        raise NodeError(f"data directory {path} belongs to uid {st.st_uid}, not this "
                        f"node's user (uid {os.getuid()}); refusing to use it")
    mode = stat.S_IMODE(st.st_mode)
    if mode != PRIVATE_MODE:
        os.chmod(path, PRIVATE_MODE)
        if log is not None:
            log.event("data_dir_mode_fixed", path=str(path), was=f"{mode:o}",
                      now=f"{PRIVATE_MODE:o}")
