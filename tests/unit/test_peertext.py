"""Peer text and labels: what a peer may put in a reason, a purpose or a label."""

from __future__ import annotations

import re

import pytest

from ispf.errors import InvalidRecord
from ispf.peertext import MASK, untrusted, untrusted_id
from ispf.records import check_label, check_name

RUN = re.compile(r"\d{9,}")


@pytest.mark.parametrize(
    "text",
    [
        "holder 3520212345671 is ours",
        "holder 35202-1234567-1 is ours",
        "3 5 2 0 2 1 2 3 4 5 6 7 1",
        "\u06f3\u06f5\u06f2\u06f0\u06f2\u06f1\u06f2\u06f3\u06f4\u06f5\u06f6\u06f7\u06f1",  # Urdu
        "352021\x00234567\x001",  # control characters hiding a run
        "35202\x1b[0m12345671",  # an escape sequence hiding a run
    ],
)
def test_digit_runs_are_masked(text: str) -> None:
    out = untrusted(text)
    assert MASK in out
    assert not RUN.search(re.sub(r"\D", "", out)), out


def test_short_numbers_stay() -> None:
    assert untrusted("chunk 12 of 40000000") == "chunk 12 of 40000000"


def test_control_characters_and_escapes_go() -> None:
    assert untrusted("a\x00b\x1b[31mc\u202ed\n") == "abcd"
    assert untrusted("\x00\x1b[31m" * 100) == ""


def test_long_text_is_cut() -> None:
    out = untrusted("x" * 10_000)
    assert len(out) == 200 and out.endswith("…")
    assert len(untrusted("y" * 500, 64)) == 64


@pytest.mark.parametrize(
    ("programme", "status", "code"),
    [
        ("3520212345671", "enrolled", "programme.digits"),
        ("BISP", "35202-1234567-1", "status.digits"),
        ("BISP 123456789", "enrolled", "programme.digits"),
        ("=cmd|' /C calc'!A0", "x", "programme.invalid"),
        ("BISP/KAFAALAT", "enrolled", "programme.invalid"),
        ("-BISP", "enrolled", "programme.invalid"),
        ("BISP\u200b", "enrolled", "programme.invalid"),
        ("P" * 65, "enrolled", "programme.too_long"),
        ("  ", "enrolled", "programme.missing"),
    ],
)
def test_bad_labels_are_refused_with_a_reason(programme: str, status: str, code: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        check_label(programme, status)
    assert info.value.reason_code == code
    assert not RUN.search(info.value.message)


def test_unicode_labels_are_nfc_normalised_and_accepted() -> None:
    decomposed = "Programme\u0301 Sehat"  # e + combining acute
    lb = check_label("احساس کفالت", "مستحق")
    assert lb.programme == "احساس کفالت"
    assert check_label("Cafe\u0301", "Enrolled").programme == "Caf\u00e9"
    assert check_label(decomposed, "x").programme == "Programm\u00e9 Sehat"
    assert check_label("BISP-2024", "Enrolled (2)").status == "enrolled (2)"


def test_ids_keep_their_digits_unless_an_id_number_is_spelt() -> None:
    from ispf.peertext import untrusted_id

    sid = "12345678-1234-4234-9234-123456789012"  # a valid UUID, all digits by chance
    assert untrusted_id(sid) == sid
    assert untrusted_id("12345678-90123456") == "12345678-90123456"
    assert "3520" not in untrusted_id("x3520212345671y") + untrusted_id("35202-1234567-1-x")
    assert untrusted_id("abc\x1b[2Jdef" + "x" * 100) == "abcdef" + "x" * 57 + "…"


@pytest.mark.parametrize(
    "number",
    [
        "42101.5555555.1",
        "42101_5555555_1",
        "42101--5555555--1",
        "42101/5555555/1",
        "42101\u20135555555\u20131",  # en dashes
        "\u2074\u00b2\u00b9\u2070\u00b9\u2075\u2075\u2075\u2075\u2075\u2075\u2075\u00b9",
        "4210\uff11\uff15\uff15\uff15\uff15\uff15\uff15\uff15\uff11",  # fullwidth
        "3520212\u0300345671",  # a combining mark inside
        "35202(1234567)1",
    ],
)
def test_an_id_number_with_any_separators_or_digit_forms_is_masked_and_refused(
    number: str,
) -> None:
    assert untrusted(f"reason {number} end") == "reason [digits] end"
    with pytest.raises(InvalidRecord, match="9 or more digits"):
        check_name("programme", f"P{number}")


def test_an_id_number_in_an_id_with_other_separators_is_masked_not_a_uuid() -> None:
    assert untrusted_id("req 42101.5555555.1") == "req [digits]"
    uuid = "12345678-1234-1234-1234-123456789012"
    assert untrusted_id(uuid) == uuid
