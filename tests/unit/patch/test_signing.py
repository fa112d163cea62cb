"""Keys and signatures: files, ids, expiry, trust, and every way they can be wrong."""

from __future__ import annotations

import datetime
import hashlib
import json
import stat
from pathlib import Path

import pytest

from micropatch.errors import MicropatchError, SignatureError
from micropatch.trust import keys as signing
from micropatch.trust.keys import (
    Signature,
    generate_key,
    load_private_key,
    load_public_key,
    trusted_keys,
    write_key_pair,
)
from micropatch.trust.signatures import verify_signatures

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
MESSAGE = b'{"some":"canonical payload"}'


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return write_key_pair(generate_key("release", expires_days=365, now=NOW), tmp_path / "release")


def test_key_files_round_trip(pair: tuple[Path, Path]) -> None:
    private_path, public_path = pair
    assert (private_path.name, public_path.name) == ("release.key", "release.pub")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    private = load_private_key(private_path)
    public = load_public_key(public_path)
    assert private.public.raw == public.raw and public.name == "release"
    assert public.keyid == hashlib.sha256(public.raw).hexdigest()
    assert public.created == NOW and public.expires == NOW + datetime.timedelta(days=365)
    document = json.loads(public_path.read_text())
    assert document == {
        "format": "micropatch-key",
        "format_version": 1,
        "kind": "public",
        "algorithm": "ed25519",
        "name": "release",
        "keyid": public.keyid,
        "public_key": public.raw.hex(),
        "created": "2030-01-01T00:00:00Z",
        "expires": "2031-01-01T00:00:00Z",
    }
    assert "private_key" not in document
    assert json.loads(private_path.read_text())["private_key"] == private.seed.hex()


def test_key_without_expiry(tmp_path: Path) -> None:
    _, public_path = write_key_pair(generate_key("forever"), tmp_path / "forever")
    key = load_public_key(public_path)
    assert key.expires is None and not key.expired(NOW + datetime.timedelta(days=100_000))


def test_existing_key_files_are_kept(pair: tuple[Path, Path], tmp_path: Path) -> None:
    before = pair[0].read_bytes()
    with pytest.raises(SignatureError, match=r"release\.key already exists; .* --force"):
        write_key_pair(generate_key("release"), tmp_path / "release")
    assert pair[0].read_bytes() == before
    write_key_pair(generate_key("release"), tmp_path / "release", force=True)
    assert pair[0].read_bytes() != before
    assert stat.S_IMODE(pair[0].stat().st_mode) == 0o600


def test_key_directory_is_created_private(tmp_path: Path) -> None:
    """`keys generate keys/release` (docs/signing.md): the directory is made, 0700."""
    private_path, public_path = write_key_pair(generate_key("release"), tmp_path / "k" / "release")
    assert private_path.exists() and public_path.exists()
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(SignatureError, match=r"cannot create the directory .*/file for"):
        write_key_pair(generate_key("release"), tmp_path / "file" / "release")


@pytest.mark.parametrize("name", ["", "a b", "../x", "-x", "x" * 65, "ключ"])
def test_bad_key_names(name: str) -> None:
    with pytest.raises(SignatureError, match="is not a key name"):
        generate_key(name)


def test_expiry_must_be_positive() -> None:
    with pytest.raises(SignatureError, match="at least 1 day"):
        generate_key("k", expires_days=0)


def test_sign_and_verify(pair: tuple[Path, Path]) -> None:
    private, public = load_private_key(pair[0]), load_public_key(pair[1])
    signature = private.sign(MESSAGE, NOW)
    assert signature.keyid == public.keyid and len(signature.sig) == 64
    result = verify_signatures("a.mpatch", MESSAGE, [signature], [public], NOW)
    assert result.signers == (public,) and result.ignored == ()
    # The signature is over the context and the message, not the bare message.
    assert not public.verify(signature.sig, signing.SIGNATURE_CONTEXT + MESSAGE)


def test_tampered_message(pair: tuple[Path, Path]) -> None:
    private, public = load_private_key(pair[0]), load_public_key(pair[1])
    signature = private.sign(MESSAGE, NOW)
    with pytest.raises(SignatureError) as info:
        verify_signatures("a.mpatch", MESSAGE + b" ", [signature], [public], NOW)
    assert str(info.value).startswith("a.mpatch: no valid signature by a trusted key: ")
    assert "key 'release'" in str(info.value) and "was modified after it was signed" in str(
        info.value
    )


def test_untrusted_key(pair: tuple[Path, Path]) -> None:
    other = generate_key("other", now=NOW)
    signature = other.sign(MESSAGE, NOW)
    with pytest.raises(SignatureError) as info:
        verify_signatures("a.mpatch", MESSAGE, [signature], [load_public_key(pair[1])], NOW)
    message = str(info.value)
    assert f"signed by key {other.public.keyid[:16]}…, which is not trusted" in message
    assert "(trusted: release (" in message


def test_expired_key(pair: tuple[Path, Path]) -> None:
    private, public = load_private_key(pair[0]), load_public_key(pair[1])
    signature = private.sign(MESSAGE, NOW)
    later = NOW + datetime.timedelta(days=366)
    with pytest.raises(SignatureError, match=r"which expired on 2031-01-01T00:00:00Z"):
        verify_signatures("a.mpatch", MESSAGE, [signature], [public], later)
    with pytest.raises(
        SignatureError, match=r"expired on 2031-01-01T00:00:00Z; generate a new key"
    ):
        private.sign(MESSAGE, later)


def test_unsigned() -> None:
    with pytest.raises(SignatureError, match=r"a\.mpatch: is not signed; sign it with"):
        verify_signatures("a.mpatch", MESSAGE, [], [], NOW)


def test_one_good_signature_is_enough(pair: tuple[Path, Path]) -> None:
    private, public = load_private_key(pair[0]), load_public_key(pair[1])
    stranger = generate_key("stranger", now=NOW).sign(MESSAGE, NOW)
    result = verify_signatures(
        "a.mpatch", MESSAGE, [stranger, private.sign(MESSAGE, NOW)], [public], NOW
    )
    assert result.signers == (public,)
    assert len(result.ignored) == 1 and "not trusted" in result.ignored[0]


def _public_document(pair: tuple[Path, Path]) -> dict[str, object]:
    return json.loads(pair[1].read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: "this is not json", "malformed key file: not JSON"),
        (lambda d: [1, 2], 'not a micropatch key \\(no "format"'),
        (lambda d: {**d, "format": "gpg"}, "not a micropatch key"),
        (lambda d: {**d, "format_version": 2}, "key format version 2 is not supported"),
        (lambda d: {**d, "algorithm": "rsa"}, "algorithm 'rsa' is not supported"),
        (lambda d: {**d, "public_key": "zz" * 32}, "public_key must be 64 lowercase hex digits"),
        (lambda d: {**d, "public_key": "ab" * 31}, "public_key must be 64 lowercase hex digits"),
        (lambda d: {**d, "keyid": "00" * 32}, "is not the SHA-256 of public_key"),
        (lambda d: {**d, "expires": "next year"}, "expires 'next year' is not a UTC time"),
        (lambda d: {**d, "expires": 1893456000}, "expires 1893456000 is not a UTC time"),
        (lambda d: {k: v for k, v in d.items() if k != "created"}, "created: required"),
        (lambda d: {**d, "name": 7}, "name 7 is not a key name"),
        (lambda d: {**d, "trust": "me"}, "unknown field 'trust'"),
        (lambda d: {**d, "kind": "private"}, "is a private key; trust the public key file"),
    ],
)
def test_malformed_public_key(pair, tmp_path, change, problem) -> None:
    bad = tmp_path / "bad.pub"
    changed = change(_public_document(pair))
    bad.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(SignatureError, match=problem) as info:
        load_public_key(bad)
    assert str(info.value).startswith(f"{bad}: ")


def test_malformed_private_key(pair, tmp_path) -> None:
    document = json.loads(pair[0].read_text())
    bad = tmp_path / "bad.key"
    bad.write_text(json.dumps({**document, "private_key": "11" * 32}))
    with pytest.raises(SignatureError, match=r"bad\.key: malformed key file: private_key does not"):
        load_private_key(bad)
    with pytest.raises(SignatureError, match=r"release\.pub: is not a private key"):
        load_private_key(pair[1])
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(SignatureError, match="not JSON"):
        load_private_key(bad)
    with pytest.raises(SignatureError, match=r"missing\.key: cannot read key file"):
        load_private_key(tmp_path / "missing.key")


def test_trusted_keys_from_files_and_directories(pair, tmp_path, monkeypatch) -> None:
    assert [k.name for k in trusted_keys([pair[1]])] == ["release"]
    assert [k.name for k in trusted_keys([tmp_path])] == ["release"]  # only *.pub files
    monkeypatch.setenv(signing.TRUST_DIR_VARIABLE, str(tmp_path))
    assert [k.name for k in trusted_keys()] == ["release"]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(signing.TRUST_DIR_VARIABLE, str(empty))
    with pytest.raises(
        SignatureError, match=r"no trusted keys in .*empty \(\$MICROPATCH_TRUST_DIR\)"
    ):
        trusted_keys()
    # Fail closed: one bad file in the trust directory is an error, not a key left out.
    (tmp_path / "broken.pub").write_text("{")
    monkeypatch.setenv(signing.TRUST_DIR_VARIABLE, str(tmp_path))
    with pytest.raises(SignatureError, match=r"broken\.pub: malformed key file"):
        trusted_keys()


def test_signature_entries() -> None:
    good = {"keyid": "ab" * 32, "sig": "cd" * 64}
    assert Signature.from_json(good).to_json() == good
    for bad in ({**good, "sig": "cd"}, {**good, "keyid": "AB" * 32}, {**good, "x": 1}, [], None):
        with pytest.raises(ValueError):
            Signature.from_json(bad)


def test_errors_are_micropatch_errors() -> None:
    assert issubclass(SignatureError, MicropatchError)
