"""``dwcp keygen`` (a DC's key, or with ``--operator`` a person's) and ``dwcp federation
init``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from federation import config
from federation.api.auth import write_operator_key
from federation.cli.main import CommandError
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
) -> Path:
    """Write keys/<dc>.key and federation.toml for ``count`` DCs on ``host``, and one
    operator, ``admin`` (role admin), with its key in keys/admin.key.

    Ports: control base+i, data base+100+i, api base+200+i (i from 1).
    """
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "keys"
    keys.mkdir(exist_ok=True)
    os.chmod(keys, 0o700)
    dcs = []
    for i in range(1, count + 1):
        name = f"dc{i}"
        ident = identity.generate()
        identity.write_key_file(keys / f"{name}.key", ident, overwrite=True)
        dcs.append(
            {
                "name": name,
                "public_key": str(ident.public),
                "control": f"{host}:{base_port + i}",
                "data": f"{host}:{base_port + 100 + i}",
                "api": f"{host}:{base_port + 200 + i}",
            }
        )
    admin = identity.generate()
    write_operator_key(keys / f"{INIT_OPERATOR}.key", admin, overwrite=True)
    operators = [{"name": INIT_OPERATOR, "public_key": str(admin.public), "role": "admin"}]
    path = directory / "federation.toml"
    path.write_text(config.render(fed_id, dcs, operators=operators))
    config.load(path)  # what we wrote must load
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
    init.set_defaults(func=_init)
    check = fsub.add_parser("check", help="validate a federation file")
    check.add_argument("path", type=Path)
    check.set_defaults(func=_check)


def _init(args: argparse.Namespace) -> int:
    if not 1 <= args.dcs <= 64:
        raise CommandError(f"--dcs must be in 1..64, got {args.dcs}")
    if not 1024 <= args.base_port <= 65535 - 300:
        raise CommandError(f"--base-port must be in 1024..{65535 - 300}")
    path = init_federation(
        args.dir, args.dcs, fed_id=args.id, host=args.host, base_port=args.base_port
    )
    print(path)
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        fed = config.load(args.path)
    except config.ConfigError as exc:
        raise CommandError(str(exc)) from None
    ops = ", ".join(f"{o.name} ({o.role.label})" for o in fed.operators) or "none"
    print(f"{args.path}: federation {fed.id!r}, {len(fed.dcs)} DCs: {', '.join(fed.names)}; "
          f"operators: {ops}")
    return 0
