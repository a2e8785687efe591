"""A node's own settings: what concerns one machine, not the federation.

::

    [storage]
    import_dirs = ["/srv/dwcp/images"]    # the only places VM images are imported from
    at_rest_key = "/etc/dwcp/dc1.at-rest" # default: beside the identity key (<DC>.at-rest)
    retained_max = "200GiB"               # retained copies' budget (default: 1/4 of the
                                          # data directory's file system)

    [api]
    metrics_token_file = "/etc/dwcp/metrics.token"   # Prometheus' bearer token, 0600

    [ledger]
    request_timeout = 30    # seconds an operation waits for the ledger, then "pending"

    [control]
    framing = "frames"      # "frames": our own framing on control links with peers that
                            # offer it (issue 14); "websocket": never offer it (a fallback)
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

from federation.vms.retention import parse_size

__all__ = ["NodeConfig", "QemuSettings", "NodeConfigError", "load_node_config",
           "render_node_config", "default_node_config", "DEFAULT_REQUEST_TIMEOUT"]

#: PbftConfig's client timeout: 30 s, well above a view change (~2.1 s on loopback,
#: docs/BENCHMARKS.md) and the WAN round trips of a commit, so a request that is merely
#: slow is not reported pending.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: An operation's whole budget at the API is 120 s (federation.api.http.OPERATION_TIMEOUT);
#: a longer wait for the ledger could never be answered.
MAX_REQUEST_TIMEOUT = 100.0


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
    #: how long an operation waits for the ledger's answer before the API says "pending,
    #: id X" (the PBFT client's timeout, consensus.pbft.state.PbftConfig.client_timeout)
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    #: the at-rest key file (None: beside the identity key, federation.vms.at_rest_key)
    at_rest_key: Path | None = None
    #: the retained copies' budget in bytes (None: a quarter of the data file system)
    retained_max: int | None = None
    #: the qemu backend's settings (None: the node runs the image backend only)
    qemu: QemuSettings | None = None
    #: offer our own framing on the control links (mesh.versions.CONTROL_FRAMES); False
    #: keeps the websocket on every link, as a node of an older build does
    control_frames: bool = True


_KEYS = {"storage": {"import_dirs", "at_rest_key", "retained_max"},
         "api": {"metrics_token_file"}, "ledger": {"request_timeout"},
         "control": {"framing"},
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
    timeout = doc.get("ledger", {}).get("request_timeout", DEFAULT_REQUEST_TIMEOUT)
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not 0.5 <= timeout <= MAX_REQUEST_TIMEOUT):
        raise NodeConfigError(f"{path}: ledger.request_timeout: expected seconds in "
                              f"0.5..{MAX_REQUEST_TIMEOUT:.0f}, got {timeout!r}")
    storage = doc.get("storage", {})
    key_file = storage.get("at_rest_key")
    if key_file is not None and (not isinstance(key_file, str) or not key_file):
        raise NodeConfigError(f"{path}: storage.at_rest_key: expected a path")
    budget = storage.get("retained_max")
    retained: int | None = None
    if budget is not None:
        try:
            if isinstance(budget, bool) or not isinstance(budget, (int, str)):
                raise ValueError(f"{budget!r} is not a size")
            retained = budget if isinstance(budget, int) else parse_size(budget)
            if retained < 0:
                raise ValueError(f"{budget!r} is negative")
        except ValueError as exc:
            raise NodeConfigError(f"{path}: storage.retained_max: {exc}") from None
    qemu = _qemu(path, doc["qemu"]) if "qemu" in doc else None
    framing = doc.get("control", {}).get("framing", "frames")
    if framing not in ("frames", "websocket"):
        raise NodeConfigError(f"{path}: control.framing: expected \"frames\" or "
                              f"\"websocket\", got {framing!r}")
    return NodeConfig(str(path), dirs, token, float(timeout),
                      here / key_file if key_file is not None else None, retained, qemu,
                      framing == "frames")


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
            f"import_dirs = [{listed}]\n"
            "# the key that seals VM images at rest (default: beside the identity key)\n"
            "# at_rest_key = \"../keys/<DC>.at-rest\"\n"
            "# the budget of retained copies (default: a quarter of the data file system)\n"
            "# retained_max = \"200GiB\"\n")
