"""Identity keys and `dwcp keygen`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation import config
from federation.api.auth import OPERATOR_KEY_PREFIX, load_operator_key
from federation.cli.keys import init_federation
from federation.cli.main import main
from mesh import identity


def test_keygen_writes_a_0600_key_and_prints_the_public_key(tmp_path: Path, capsys) -> None:
    path = tmp_path / "dc1.key"
    assert main(["keygen", "--out", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    printed = capsys.readouterr().out.strip()
    ident = identity.load_key_file(path)
    assert printed == str(ident.public)
    assert identity.parse_public_key(printed) == ident.public


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    path = tmp_path / "dc1.key"
    assert main(["keygen", "--out", str(path)]) == 0
    before = path.read_bytes()
    assert main(["keygen", "--out", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    identity.write_key_file(path, identity.generate())
    os.chmod(path, mode)
    with pytest.raises(identity.IdentityError, match="chmod 600"):
        identity.load_key_file(path)


def test_missing_and_malformed_key_files(tmp_path: Path) -> None:
    with pytest.raises(identity.IdentityError, match="no such key file"):
        identity.load_key_file(tmp_path / "none.key")
    bad = tmp_path / "bad.key"
    bad.write_text("hello\n")
    os.chmod(bad, 0o600)
    with pytest.raises(identity.IdentityError, match="not a DWCP key file"):
        identity.load_key_file(bad)
    bad.write_text(identity.SECRET_PREFIX + "AAAA\n")
    with pytest.raises(identity.IdentityError, match="seed is 3 bytes"):
        identity.load_key_file(bad)


def test_signatures_verify_only_the_signed_bytes() -> None:
    ident = identity.generate()
    sig = ident.sign(b"payload")
    assert ident.public.verify(b"payload", sig)
    assert not ident.public.verify(b"payloae", sig)
    assert not ident.public.verify(b"payload", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not identity.generate().public.verify(b"payload", sig)


#: The eight points of small order on edwards25519 (the torsion subgroup), as the
#: libsodium source lists them (ed25519_ref10.c, ``blocklist`` of ge25519_has_small_order):
#: a public key or an R of small order is how a signature "verifies" without the secret
#: key under the looser rules (ZIP 215, OpenSSL's cofactorless check without the order
#: test): under the identity key, R = the identity and S = 0 satisfy the equation for
#: every message. libsodium refuses them; that is why verification stays on PyNaCl
#: (docs/BENCHMARKS.md, "CPU per command in a replica's execution").
SMALL_ORDER = [bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
)]


@pytest.mark.parametrize("key", SMALL_ORDER)
@given(message=st.binary(max_size=200), r=st.sampled_from(SMALL_ORDER))
def test_a_small_order_key_verifies_nothing(key: bytes, message: bytes, r: bytes) -> None:
    """No signature made without a secret key verifies: a small-order public key with a
    small-order R and S = 0 (which ZIP 215 and OpenSSL accept for the identity key)."""
    public = identity.PublicKey(key)
    assert not public.verify(message, r + bytes(32))
    assert not public.verify(message, bytes(64))


@given(st.text(max_size=80))
def test_parse_public_key_gives_only_identity_error(text: str) -> None:
    try:
        identity.parse_public_key(text)
    except identity.IdentityError:
        pass


@given(st.binary(max_size=40))
def test_parse_public_key_of_arbitrary_bytes(raw: bytes) -> None:
    if len(raw) != 32:
        with pytest.raises(identity.IdentityError, match="32 bytes"):
            identity.parse_public_key(identity.format_public_key(raw))
    else:
        assert identity.parse_public_key(identity.format_public_key(raw)).raw == raw


def test_keygen_operator_makes_an_operator_key_a_dc_cannot_use(tmp_path: Path) -> None:
    path = tmp_path / "alice.key"
    assert main(["keygen", "--operator", "--out", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith(OPERATOR_KEY_PREFIX)
    with pytest.raises(identity.IdentityError, match="not a DWCP key file"):
        identity.load_key_file(path)  # not a DC key
    fed = config.load(init_federation(tmp_path / "fed", 4, base_port=20500))
    with pytest.raises(identity.IdentityError, match="is not an operator in"):
        load_operator_key(path, fed)  # not listed
    with pytest.raises(identity.IdentityError, match="is a DC key, not an operator key"):
        load_operator_key(tmp_path / "fed" / "keys" / "dc1.key", fed)
    assert main(["keygen", "--operator", "--out", str(path)]) == 2  # never overwritten
