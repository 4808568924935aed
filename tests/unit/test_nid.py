"""Canonical form and rejection reasons for CNIC/CRC/NICOP numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ispf.errors import InvalidNationalId
from ispf.nid import canonicalise


@pytest.mark.parametrize(
    "raw",
    [
        "3520212345671",
        "35202-1234567-1",
        "  3520212345671\t",
        "٣٥٢٠٢١٢٣٤٥٦٧١",  # Eastern Arabic digits
        "۳۵۲۰۲-۱۲۳۴۵۶۷-۱",  # Urdu (Extended Arabic-Indic) digits, printed form
        "٣520212345671",  # one Eastern Arabic digit among ASCII ones
    ],
)
def test_accepted_spellings_share_one_canonical_form(raw: str) -> None:
    assert canonicalise(raw).digits == "3520212345671"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", "nid.empty"),
        ("   ", "nid.empty"),
        ("352021234567", "nid.length"),
        ("35202123456712", "nid.length"),
        ("3520-21234567-1", "nid.dash_position"),
        ("35202-12345671", "nid.dash_position"),
        ("35202--1234567-1", "nid.dash_position"),
        ("3520212345671-", "nid.dash_position"),
        ("35202 1234567 1", "nid.non_digit"),
        ("3520A12345671", "nid.non_digit"),
        ("३520212345671", "nid.non_ascii"),  # Devanagari digits are not read as ASCII
        ("3.52021E+12", "nid.number_format"),
        ("3,52021E+12", "nid.number_format"),
        ("3520212345671e0", "nid.number_format"),
        ("３520212345671", "nid.non_ascii"),
        ("9520212345671", "nid.province"),
        ("0520212345671", "nid.province"),
        ("8130212345671", "nid.province"),
    ],
)
def test_rejections_name_the_reason(raw: str, code: str) -> None:
    with pytest.raises(InvalidNationalId) as info:
        canonicalise(raw)
    assert info.value.reason_code == code


def test_allowed_province_digits_are_configurable() -> None:
    assert canonicalise("8130212345671", province_digits="12345678").digits == "8130212345671"
    with pytest.raises(InvalidNationalId):
        canonicalise("3520212345671", province_digits="8")


@given(st.sampled_from("1234567"), st.text("0123456789", min_size=12, max_size=12))
def test_any_valid_number_round_trips_in_both_spellings(first: str, rest: str) -> None:
    digits = first + rest
    dashed = f"{digits[:5]}-{digits[5:12]}-{digits[12]}"
    assert canonicalise(digits).digits == digits == canonicalise(dashed).digits


@given(st.text(max_size=30))
def test_arbitrary_text_is_accepted_or_rejected_with_a_reason_that_hides_it(raw: str) -> None:
    try:
        canonicalise(raw)
    except InvalidNationalId as exc:
        digits = "".join(c for c in raw if c in "0123456789")
        if len(digits) >= 6:
            assert digits not in exc.message
        assert exc.reason_code.startswith("nid.")


def test_repr_and_str_mask_the_number() -> None:
    nid = canonicalise("3520212345671")
    for text in (repr(nid), str(nid), f"{nid}", repr([nid])):
        assert "3520212345671" not in text and "1234567" not in text
