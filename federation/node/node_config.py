"""A node's own settings: what concerns one machine, not the federation.

::

    [storage]
    import_dirs = ["/srv/dwcp/images"]    # the only places VM images are imported from

    [api]
    metrics_token_file = "/etc/dwcp/metrics.token"   # Prometheus' bearer token, 0600

    [qemu]                                # present: this node runs qemu guests too
    guest_files = ["/srv/dwcp/guests"]    # kernels and initramfs a guest may boot from
    allowed_args = ["-cpu", "qemu64"]     # the only extra QEMU arguments a spec may carry
    accel = "auto"                        # auto (KVM where a guest boots), kvm or tcg
    ram_dir = "/dev/shm/dwcp-dc1"         # guest RAM files: tmpfs (default under /dev/shm)
    downtime_limit_ms = 300               # the downtime a guest's migration aims at

With a ``[qemu]`` table the node's VMs live in two backends, chosen per VM
(:mod:`federation.vms.per_vm`): imported image files in the ``image`` backend, guests
created from a spec (``dwcp vm create --node``) or arriving by migration with one in the
``qemu`` backend. ``guest_files`` and ``allowed_args`` bound what a spec may ask of this
host, whether an operator's or a migration source's.

``dwcp node --node-config FILE`` (default ``<federation file's dir>/nodes/<DC>.toml``
when it exists, which ``dwcp federation init`` writes). The federation file is the same
at every DC; these settings are a machine's file-system paths, so they live apart from
it. Relative paths are relative to this file. Unknown options are errors, and every
error names the file and the field.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import attrs

__all__ = ["NodeConfig", "QemuSettings", "NodeConfigError", "load_node_config",
           "render_node_config", "default_node_config"]


class NodeConfigError(Exception):
    """A node config that cannot be used; the message names the file and the field."""


@attrs.frozen
class QemuSettings:
    #: directories a qemu VM's kernel and initramfs must lie under
    guest_files: tuple[Path, ...] = ()
    #: the extra QEMU arguments a spec may carry (each one must be in this list)
    allowed_args: tuple[str, ...] = ()
    accel: str = "auto"
    #: where guest RAM files go (None: under /dev/shm, see federation.cli.run_node)
    ram_dir: Path | None = None
    #: the downtime a guest's migration aims at: QEMU's default downtime-limit
    downtime_limit_ms: int = 300


@attrs.frozen
class NodeConfig:
    source: str = "<none>"
    #: directories VM images may be imported from (none: imports are refused)
    import_dirs: tuple[Path, ...] = ()
    #: the bearer token that lets Prometheus read /metrics ("" : only signed requests)
    metrics_token: str = ""
    #: the qemu backend's settings (None: the node runs the image backend only)
    qemu: QemuSettings | None = None


_KEYS = {"storage": {"import_dirs"}, "api": {"metrics_token_file"},
         "qemu": {"guest_files", "allowed_args", "accel", "ram_dir", "downtime_limit_ms"}}


def default_node_config(federation_file: Path, name: str) -> Path:
    return federation_file.parent / "nodes" / f"{name}.toml"


def load_node_config(path: Path) -> NodeConfig:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NodeConfigError(f"{path}: no such node config") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NodeConfigError(f"{path}: cannot read: {exc}") from None
    for table, value in doc.items():
        if table not in _KEYS:
            raise NodeConfigError(f"{path}: {table}: unknown table (allowed: "
                                  f"{', '.join(sorted(_KEYS))})")
        if not isinstance(value, dict):
            raise NodeConfigError(f"{path}: {table}: expected a table")
        extra = sorted(set(value) - _KEYS[table])
        if extra:
            raise NodeConfigError(f"{path}: {table}.{extra[0]}: unknown option (allowed: "
                                  f"{', '.join(sorted(_KEYS[table]))})")
    here = path.parent
    raw_dirs = doc.get("storage", {}).get("import_dirs", [])
    if not isinstance(raw_dirs, list) or not all(isinstance(d, str) and d for d in raw_dirs):
        raise NodeConfigError(f"{path}: storage.import_dirs: expected a list of paths")
    dirs = tuple(here / d for d in raw_dirs)
    token = ""
    token_file = doc.get("api", {}).get("metrics_token_file")
    if token_file is not None:
        if not isinstance(token_file, str) or not token_file:
            raise NodeConfigError(f"{path}: api.metrics_token_file: expected a path")
        token = _read_token(path, here / token_file)
    qemu = _qemu(path, doc["qemu"]) if "qemu" in doc else None
    return NodeConfig(str(path), dirs, token, qemu)


def _qemu(path: Path, table: dict[str, object]) -> QemuSettings:
    here = path.parent
    files = table.get("guest_files", [])
    if not isinstance(files, list) or not all(isinstance(d, str) and d for d in files):
        raise NodeConfigError(f"{path}: qemu.guest_files: expected a list of paths")
    args = table.get("allowed_args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) and a for a in args):
        raise NodeConfigError(f"{path}: qemu.allowed_args: expected a list of strings")
    accel = table.get("accel", "auto")
    if accel not in ("auto", "kvm", "tcg"):
        raise NodeConfigError(f"{path}: qemu.accel: expected auto, kvm or tcg, got {accel!r}")
    ram = table.get("ram_dir")
    if ram is not None and (not isinstance(ram, str) or not ram):
        raise NodeConfigError(f"{path}: qemu.ram_dir: expected a path")
    limit = table.get("downtime_limit_ms", 300)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 600_000:
        raise NodeConfigError(f"{path}: qemu.downtime_limit_ms: expected 1..600000, "
                              f"got {limit!r}")
    return QemuSettings(tuple(here / d for d in files), tuple(args), str(accel),
                        None if ram is None else here / ram, limit)


def _read_token(path: Path, token_path: Path) -> str:
    where = f"{path}: api.metrics_token_file"
    try:
        st = os.stat(token_path)
        text = token_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeConfigError(f"{where}: {token_path}: cannot read: {exc}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise NodeConfigError(f"{where}: {token_path} is readable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):o}); chmod 600")
    if len(text) < 32 or not text.isprintable() or " " in text:
        raise NodeConfigError(f"{where}: {token_path}: expected one token of at least 32 "
                              "printable characters (e.g. from 'openssl rand -hex 32')")
    return text


def render_node_config(import_dirs: list[str]) -> str:
    """A node config that names these import directories (``dwcp federation init``)."""
    listed = ", ".join(f'"{d}"' for d in import_dirs)
    return ("# this node's own settings (docs/operations.md, \"The node config\")\n"
            "[storage]\n"
            "# VM images are imported only from under these directories\n"
            f"import_dirs = [{listed}]\n")
