"""``dwcp keygen`` (a DC's key, or with ``--operator`` a person's) and ``dwcp federation
init``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from federation import config
from federation.api.auth import write_operator_key
from federation.cli.main import CommandError
from federation.config_print import federation_print
from federation.node.node_config import render_node_config
from mesh import identity

#: The operator ``federation init`` makes (role admin), its key in keys/<name>.key.
INIT_OPERATOR = "admin"


def register_keygen(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "keygen", help="create a DC identity key (mode 0600) and print its public key"
    )
    p.add_argument("--out", required=True, help="path of the new key file")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.add_argument("--operator", action="store_true",
                   help="an operator's key (a person's, for [[operators]]), not a DC's")
    p.set_defaults(func=keygen)


def keygen(args: argparse.Namespace) -> int:
    ident = identity.generate()
    try:
        if args.operator:
            write_operator_key(args.out, ident, overwrite=args.force)
        else:
            identity.write_key_file(args.out, ident, overwrite=args.force)
    except identity.IdentityError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{args.out}: {exc.strerror}") from None
    print(ident.public)
    return 0


def init_federation(
    directory: Path,
    count: int,
    *,
    fed_id: str = "local",
    host: str = "127.0.0.1",
    base_port: int = 7100,
    hosts: Mapping[str, str] | None = None,
) -> Path:
    """Write keys/<dc>.key and federation.toml for ``count`` DCs on ``host`` (a DC named
    in ``hosts`` on the address given there: e.g. one DC behind another network
    namespace's link, ``dwcp bench live``), and one
    operator, ``admin`` (role admin), with its key in keys/admin.key; and for each DC a
    node config, nodes/<dc>.toml, whose import directory is ``images/`` (mode 0700).

    Ports: control base+i, data base+100+i, api base+200+i (i from 1).
    """
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "keys"
    keys.mkdir(exist_ok=True)
    os.chmod(keys, 0o700)
    dcs = []
    for i in range(1, count + 1):
        name = f"dc{i}"
        at = (hosts or {}).get(name, host)
        ident = identity.generate()
        identity.write_key_file(keys / f"{name}.key", ident, overwrite=True)
        dcs.append(
            {
                "name": name,
                "public_key": str(ident.public),
                "control": f"{at}:{base_port + i}",
                "data": f"{at}:{base_port + 100 + i}",
                "api": f"{at}:{base_port + 200 + i}",
            }
        )
    admin = identity.generate()
    write_operator_key(keys / f"{INIT_OPERATOR}.key", admin, overwrite=True)
    operators = [{"name": INIT_OPERATOR, "public_key": str(admin.public), "role": "admin"}]
    path = directory / "federation.toml"
    path.write_text(config.render(fed_id, dcs, operators=operators))
    config.load(path)  # what we wrote must load
    images = directory / "images"
    images.mkdir(mode=0o700, exist_ok=True)
    nodes = directory / "nodes"
    nodes.mkdir(exist_ok=True)
    for dc in dcs:
        (nodes / f"{dc['name']}.toml").write_text(render_node_config(["../images"]))
    return path


def register_federation(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("federation", help="create or check federation files")
    fsub = p.add_subparsers(dest="federation_command", required=True)
    init = fsub.add_parser("init", help="write keys and a federation file for N DCs on one host")
    init.add_argument("--dir", required=True, type=Path)
    init.add_argument("--dcs", type=int, default=4)
    init.add_argument("--id", default="local")
    init.add_argument("--host", default="127.0.0.1")
    init.add_argument("--base-port", type=int, default=7100)
    init.add_argument("--force", action="store_true",
                      help="replace the keys and files of a directory that has them already "
                           "(every DC's key and the admin's: the federation is a new one)")
    init.set_defaults(func=_init)
    check = fsub.add_parser("check", help="validate a federation file")
    check.add_argument("path", type=Path)
    check.set_defaults(func=_check)
    rotate = fsub.add_parser(
        "rotate-key", help="give a DC a new identity key and write it into the federation file")
    rotate.add_argument("dc", metavar="DC")
    rotate.add_argument("--config", required=True, type=Path, help="the federation file")
    rotate.add_argument("--key", type=Path,
                        help="the DC's key file (default: <config dir>/keys/<DC>.key)")
    rotate.set_defaults(func=_rotate)


def _init(args: argparse.Namespace) -> int:
    held = _existing(args.dir)
    if held and not args.force:
        raise CommandError(f"{args.dir} already holds {', '.join(held)}: refusing to replace "
                           "them (their keys are a running federation's identities); choose "
                           "another --dir, or give --force to make a new federation there")
    if not 1 <= args.dcs <= 64:
        raise CommandError(f"--dcs must be in 1..64, got {args.dcs}")
    if not 1024 <= args.base_port <= 65535 - 300:
        raise CommandError(f"--base-port must be in 1024..{65535 - 300}")
    path = init_federation(
        args.dir, args.dcs, fed_id=args.id, host=args.host, base_port=args.base_port
    )
    print(path)
    return 0


def _existing(directory: Path) -> list[str]:
    """What of a federation ``directory`` already holds (empty: nothing to lose)."""
    if not directory.is_dir():
        return []
    held = []
    if (directory / "federation.toml").exists():
        held.append("federation.toml")
    keys = directory / "keys"
    if keys.is_dir():
        n = len([k for k in keys.iterdir() if k.suffix == ".key"])
        if n:
            held.append(f"keys/ ({n} key files)")
    for sub in ("nodes", "data"):
        if (directory / sub).is_dir() and any((directory / sub).iterdir()):
            held.append(f"{sub}/")
    return held


def _check(args: argparse.Namespace) -> int:
    try:
        fed = config.load(args.path)
    except config.ConfigError as exc:
        raise CommandError(str(exc)) from None
    ops = ", ".join(f"{o.name} ({o.role.label})" for o in fed.operators) or "none"
    print(f"{args.path}: federation {fed.id!r}, {len(fed.dcs)} DCs: {', '.join(fed.names)}; "
          f"operators: {ops}")
    print(f"digest {federation_print(fed).digest.hex()} (every DC must run a file with this "
          "digest: a node refuses the links of a peer whose digest differs)")
    for warning in fault_tolerance_warnings(len(fed.dcs)):
        print(f"warning: {warning}")
    return 0


def fault_tolerance_warnings(n: int) -> list[str]:
    """What an operator must know about a federation of ``n`` DCs: PBFT needs n = 3f+1
    with f >= 1 (consensus.pbft.quorum) to order a ledger that survives a faulty DC."""
    if n < 4:
        return [f"{n} DC{'s' if n != 1 else ''}: no fault tolerance. PBFT needs at least 4 "
                "DCs (3f+1, f >= 1) to survive one faulty DC; this federation has no "
                "ledger, so no VM can be imported, migrated or deleted"]
    f = (n - 1) // 3
    if n != 3 * f + 1:
        return [f"{n} DCs: the ledger needs n = 3f+1 DCs exactly (4, 7, 10, ...); this "
                f"federation has no ledger, so no VM can be imported, migrated or deleted "
                f"(add {3 * (f + 1) + 1 - n} DC(s), or remove {n - 3 * f - 1})"]
    return []


def rotate_key(config_path: Path, dc: str, key_path: Path) -> tuple[str, str]:
    """A new identity key for ``dc``: the old key file is kept as ``<key>.old``, the new one
    written in its place (0600), and the federation file's ``public_key`` of ``dc``
    replaced in the text (comments and layout kept). Returns (old, new) public keys.

    Order of the writes: the new key goes to ``<key>.new`` (synced), then the federation
    file is replaced atomically (temp file, fsync, rename), then the key files are
    renamed. A crash before the file's rename leaves the old file and key working and a
    stray ``.new``; after it, the file names the new key, which is in ``<key>.new`` or
    already in place: run the command's last step by hand (``mv <key>.new <key>``)."""
    try:
        fed = config.load(config_path)
        old = fed.dc(dc).public_key
    except config.ConfigError as exc:
        raise CommandError(str(exc)) from None
    text = config_path.read_text(encoding="utf-8")
    if text.count(str(old)) != 1:
        raise CommandError(f"{config_path}: {dc}'s public key {old} appears "
                           f"{text.count(str(old))} times; edit the file by hand")
    ident = identity.generate()
    fresh = key_path.with_name(key_path.name + ".new")
    try:
        identity.write_key_file(fresh, ident, overwrite=True)
    except (identity.IdentityError, OSError) as exc:
        raise CommandError(f"{fresh}: {exc}") from None
    new_text = _with_new_key(text, dc, old, ident.public, fed.dc(dc).previous_keys)
    try:
        config.loads(new_text, str(config_path))
    except config.ConfigError as exc:
        fresh.unlink()
        raise CommandError(str(exc)) from None
    tmp = config_path.with_name(config_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new_text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, config_path)
    if key_path.exists():
        os.replace(key_path, key_path.with_name(key_path.name + ".old"))
    os.replace(fresh, key_path)
    return str(old), str(ident.public)


def _with_new_key(text: str, dc: str, old: identity.PublicKey, new: identity.PublicKey,
                  previous: tuple[identity.PublicKey, ...]) -> str:
    """The file's text with ``dc``'s key replaced by ``new`` and ``old`` added to its
    ``previous_keys`` (the ledger's signed history is signed with it)."""
    keys = ", ".join(f'"{k}"' for k in (*previous, old))
    lines = text.splitlines(keepends=True)
    out = []
    for line in lines:
        if str(old) in line:
            out.append(line.replace(str(old), str(new)))
            out.append(f"previous_keys = [{keys}]\n")
        elif line.lstrip().startswith("previous_keys") and any(str(k) in line
                                                              for k in previous):
            continue  # this DC's old list, rewritten above with the old key added
        else:
            out.append(line)
    return "".join(out)


def _rotate(args: argparse.Namespace) -> int:
    key_path = args.key or args.config.parent / "keys" / f"{args.dc}.key"
    old, new = rotate_key(args.config, args.dc, key_path)
    print(f"{args.dc}: new key {new} in {key_path} (the old one, {old}, in "
          f"{key_path.name}.old); {args.config} names the new key")
    print(f"next: copy {args.config.name} to every DC, then restart {args.dc}'s node with the "
          "new key and every other node with the new file, one after the other; until "
          "both ends of a link run the new file the link is refused, and /ready names why")
    return 0
