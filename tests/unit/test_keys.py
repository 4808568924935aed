"""Key objects never show their bytes, refuse pickling; key files must be owner-only."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ispf.errors import KeyFileError
from ispf.keys import BlindingKey, ForumSalt


def test_repr_hides_secrets() -> None:
    salt = ForumSalt.generate(7)
    key = BlindingKey.generate()
    for obj, raw in ((salt, salt.unsafe_raw()), (key, key.unsafe_raw())):
        text = repr(obj) + str(obj) + f"{obj!r}"
        assert raw.hex() not in text and str(raw) not in text
    assert "epoch=7" in repr(salt)


@pytest.mark.parametrize("make", [lambda: ForumSalt.generate(1), BlindingKey.generate])
def test_keys_refuse_pickling(make: object) -> None:
    with pytest.raises(TypeError, match="refuses to be pickled"):
        pickle.dumps(make())  # type: ignore[operator]


def test_key_check_value_tells_salts_apart_without_revealing_them(tmp_path: Path) -> None:
    a, b = ForumSalt.generate(1), ForumSalt.generate(1)
    assert a.key_check() != b.key_check()
    assert len(a.key_check()) == 8
    path = tmp_path / "epoch-1.salt"
    a.to_file(path)
    same = ForumSalt.from_file(path, 1)
    assert same == a and same.key_check() == a.key_check()
    assert a.key_check() not in a.unsafe_raw()


def test_salt_file_readable_by_others_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "epoch-1.salt"
    ForumSalt.generate(1).to_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"epoch-1\.salt.*chmod 600"):
        ForumSalt.from_file(path, 1)


def test_malformed_salt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.salt"
    path.write_text("not hex\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not hex"):
        ForumSalt.from_file(path, 1)
    path.write_text("abcd\n")
    with pytest.raises(KeyFileError, match="32 bytes"):
        ForumSalt.from_file(path, 1)
