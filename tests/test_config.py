"""Federation files: the example loads, and every mistake names the file and the field."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation import config
from federation.cli.keys import init_federation
from mesh import identity

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "federation.toml"
KEY = str(identity.Identity.from_seed(b"\x01" * 32).public)
KEY2 = str(identity.Identity.from_seed(b"\x02" * 32).public)


def dc(name: str, key: str, port: int, **extra: str) -> str:
    lines = [
        "[[dc]]",
        f'name = "{name}"',
        f'public_key = "{key}"',
        f'control = "127.0.0.1:{port}"',
        f'data = "127.0.0.1:{port + 1}"',
        f'api = "127.0.0.1:{port + 2}"',
    ]
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


HEAD = '[federation]\nid = "f"\n'


def test_the_example_describes_four_loopback_dcs() -> None:
    fed = config.load(EXAMPLE)
    assert fed.names == ("dc1", "dc2", "dc3", "dc4")
    assert all(d.control.host == "127.0.0.1" for d in fed.dcs)
    assert fed.modes == config.ModeThresholds()


def test_init_federation_round_trips(tmp_path: Path) -> None:
    path = init_federation(tmp_path, 3, fed_id="t", base_port=20000)
    fed = config.load(path)
    assert fed.names == ("dc1", "dc2", "dc3")
    for d in fed.dcs:
        ident = identity.load_key_file(tmp_path / "keys" / f"{d.name}.key")
        assert ident.public == d.public_key


def test_init_federation_places_a_dc_on_its_own_address(tmp_path: Path) -> None:
    fed = config.load(init_federation(tmp_path, 4, base_port=20000, host="10.214.9.1",
                                      hosts={"dc3": "10.214.9.2"}))
    for d in fed.dcs:
        want = "10.214.9.2" if d.name == "dc3" else "10.214.9.1"
        assert {d.control.host, d.data.host, d.api.host} == {want}, d


@pytest.mark.parametrize(
    "text, where",
    [
        (HEAD + dc("a", KEY, 1000) + dc("a", KEY2, 2000), "dc[1].name: duplicate DC name 'a'"),
        (HEAD + dc("a", "ed25519:AAAA", 1000), "dc[0].public_key"),
        (HEAD + dc("a", "rsa:xyz", 1000), "dc[0].public_key"),
        (HEAD + dc("a", KEY, 1000) + dc("b", KEY, 2000), "dc[1].public_key: same key"),
        (HEAD + dc("a", KEY, 1000).replace("127.0.0.1:1000", "127.0.0.1"), "dc[0].control"),
        (
            HEAD + dc("a", KEY, 1000).replace("127.0.0.1:1000", "127.0.0.1:70000"),
            "dc[0].control: port",
        ),
        (
            HEAD + dc("a", KEY, 1000).replace("127.0.0.1:1001", "127.0.0.1:1000"),
            "dc[0].data: 127.0.0.1:1000",
        ),
        (HEAD + dc("a", KEY, 1000, colour="red"), "dc[0].colour: unknown option"),
        (HEAD + "colour = 1\n" + dc("a", KEY, 1000), "federation.colour: unknown option"),
        ('[federation]\nid = "F!"\n' + dc("a", KEY, 1000), "federation.id"),
        ("[federation]\n" + dc("a", KEY, 1000), "federation.id: missing"),
        (HEAD, "dc: expected at least one"),
        (
            HEAD + "[modes]\ndatacenter_rtt_ms = 100.0\n" + dc("a", KEY, 1000),
            "modes.datacenter_rtt_ms",
        ),
        (HEAD + "[modes]\ninternet_loss = 5\n" + dc("a", KEY, 1000), "modes.internet_loss"),
        (HEAD + "[modes]\nhysteresis = 0\n" + dc("a", KEY, 1000), "modes.hysteresis"),
        (HEAD + "[modes]\nrtt = 1\n" + dc("a", KEY, 1000), "modes.rtt: unknown option"),
        (HEAD + "versions = [2]\n" + dc("a", KEY, 1000), "federation.versions"),
        (HEAD + "[[dc]]\nname = 'a'\n", "dc[0].public_key: missing"),
        ("[federation\n", "not valid TOML"),
        (HEAD + "extra = 1\n" + dc("a", KEY, 1000), "federation.extra"),
        ("nonsense = 1\n" + HEAD + dc("a", KEY, 1000), "nonsense: unknown option"),
    ],
)
def test_errors_name_the_file_and_the_field(text: str, where: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.loads(text, "fed.toml")
    assert str(err.value).startswith("fed.toml: ")
    assert where in str(err.value)


def test_ipv6_endpoints() -> None:
    text = HEAD + dc("a", KEY, 1000).replace('"127.0.0.1:1000"', '"[::1]:1000"')
    fed = config.loads(text)
    assert fed.dc("a").control == config.Endpoint("::1", 1000)
    assert str(fed.dc("a").control) == "[::1]:1000"
    with pytest.raises(config.ConfigError, match="no DC named 'z'"):
        fed.dc("z")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="no such federation file"):
        config.load(tmp_path / "none.toml")


@given(st.text(max_size=400))
def test_arbitrary_text_gives_only_config_error(text: str) -> None:
    try:
        config.loads(text, "fuzz.toml")
    except config.ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")


_values = st.one_of(
    st.integers(-5, 70000),
    st.text(st.characters(blacklist_characters="\x7f"), max_size=12),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(st.integers(0, 5), max_size=3),
)


@given(
    st.dictionaries(
        st.sampled_from(["name", "public_key", "control", "data", "api", "region", "x"]), _values
    )
)
def test_arbitrary_dc_tables_give_only_config_error(table: dict) -> None:
    def toml_value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)

    body = HEAD + "[[dc]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
    tomllib.loads(body)  # the document is valid TOML: the fields themselves are what is fuzzed
    try:
        config.loads(body, "fuzz.toml")
    except config.ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")


# --------------------------------------------------------------------------- operators

OP_KEY = str(identity.Identity.from_seed(b"\x03" * 32).public)
OP_KEY2 = str(identity.Identity.from_seed(b"\x04" * 32).public)


def operator(name: str, key: str, role: str) -> str:
    return f'[[operators]]\nname = "{name}"\npublic_key = "{key}"\nrole = "{role}"\n'


def test_operators_load_with_their_roles() -> None:
    fed = config.loads(HEAD + dc("a", KEY, 1000) + operator("alice", OP_KEY, "admin")
                       + operator("bob", OP_KEY2, "viewer"))
    assert [(o.name, o.role) for o in fed.operators] == [
        ("alice", config.Role.ADMIN), ("bob", config.Role.VIEWER)]
    table = fed.operator_table()
    assert table.federation == "f" and table.get("bob") is not None
    assert config.Role.VIEWER < config.Role.OPERATOR < config.Role.ADMIN
    assert config.loads(HEAD + dc("a", KEY, 1000)).operators == ()


@pytest.mark.parametrize(
    "extra, where",
    [
        (operator("alice", OP_KEY, "root"),
         "operators[0].role: expected one of viewer, operator, admin, got 'root'"),
        (operator("Alice", OP_KEY, "admin"), "operators[0].name: 'Alice' must be"),
        (operator("alice", KEY, "admin"),
         "operators[0].public_key: is DC 'a''s key; an operator has a key of its own"),
        (operator("alice", "ed25519:AAAA", "admin"), "operators[0].public_key"),
        (operator("alice", OP_KEY, "admin") + operator("alice", OP_KEY2, "viewer"),
         "operators[1].name: duplicate operator name 'alice' (also operators[0])"),
        (operator("alice", OP_KEY, "admin") + operator("bob", OP_KEY, "viewer"),
         "operators[1].public_key: same key as operator 'alice'"),
        ('[[operators]]\nname = "alice"\nrole = "admin"\n', "operators[0].public_key: missing"),
        (operator("alice", OP_KEY, "admin").replace('role = "admin"', 'role = "admin"\nx = 1'),
         "operators[0].x: unknown option"),
        ('operators = "alice"\n', "operators: expected [[operators]] tables"),
    ],
)
def test_operator_mistakes_name_the_field(extra: str, where: str) -> None:
    text = (extra + HEAD + dc("a", KEY, 1000)) if extra.startswith("operators =") else (
        HEAD + dc("a", KEY, 1000) + extra)
    with pytest.raises(config.ConfigError) as err:
        config.loads(text, "fed.toml")
    assert f"fed.toml: {where}" in str(err.value)


def test_init_makes_an_admin_operator_key(tmp_path: Path) -> None:
    from federation.api.auth import load_operator_key

    fed = config.load(init_federation(tmp_path, 4, base_port=20400))
    key = load_operator_key(tmp_path / "keys" / "admin.key", fed)
    assert key.name == "admin" and fed.operator_table().get("admin").role is config.Role.ADMIN  # type: ignore[union-attr]
    assert (tmp_path / "keys" / "admin.key").stat().st_mode & 0o777 == 0o600
