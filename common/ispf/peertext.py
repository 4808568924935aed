"""Text that arrives from a peer, made safe for a log line, an error or the store.

A peer chooses the reason in its `Abort`, the purpose and session id of its
handshake, the request id in its metadata and the details of every error it
answers with. None of it is trusted: `untrusted` is the one gate such text
passes before it is logged, echoed or stored. It drops control and format
characters (terminal escape sequences whole), masks every run of 9 or more
digits (a 13-digit ID number, dashed or not, in any script's digits) and cuts
the text to a bound.
"""

from __future__ import annotations

import re
import unicodedata

MAX_PEER_TEXT = 200
MASK = "[digits]"
# ESC-led terminal sequences (CSI `ESC [ ... final`, or ESC and one character).
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|.)?", re.DOTALL)
# 9 or more digits (\d: any script's, matched on the NFKC form so superscript and
# fullwidth digits count too), up to three separators between two of them (any
# character that is not a letter or digit: dashes, dots, slashes, underscores,
# spaces, combining marks), so `35202-1234567-1`, `35202.1234567.1` and
# `3520212345671` are all caught.
DIGIT_RUN = re.compile(r"\d(?:[\W_]{0,3}\d){8,}")


def has_digit_run(text: str) -> bool:
    """Whether `text` holds what could be an ID number (a run of 9+ digits, as above)."""
    return DIGIT_RUN.search(unicodedata.normalize("NFKC", text)) is not None


# In an id (a UUID, a request id: hex and dashes) digit runs are common by chance;
# only a whole ID number is masked there: 13 digits in a row, or dashed as an ID
# is written. (No UUID or request id group is that long.)
# Other separators than dashes (which UUIDs use) are allowed between its digits.
_ID_DIGIT_RUN = re.compile(r"\d(?:[^\w\-]{0,3}\d){12,}|\d{5}-\d{7}-\d")


def untrusted_id(text: str, limit: int = 64) -> str:
    """A session or request id from a peer, as it may be logged: `untrusted`, except
    that only an ID number (13 digits in a row, or `NNNNN-NNNNNNN-N`) is masked, so
    a UUID or request id always stays readable."""
    head = _ESCAPE.sub("", text[: 4 * limit + 64])
    head = "".join(c for c in head if c.isprintable())
    head = _ID_DIGIT_RUN.sub(MASK, unicodedata.normalize("NFKC", head)).strip()
    return head if len(head) <= limit else head[: limit - 1] + "…"


def untrusted(text: str, limit: int = MAX_PEER_TEXT) -> str:
    """`text` from a peer as it may be logged, echoed or stored (at most `limit` chars).

    The result is printable, holds no run of 9+ digits and is NFKC-normalised.
    Empty when nothing printable is left.
    """
    head = text[: 4 * limit + 64]  # (bounded work; a run cut here is still long)
    head = _ESCAPE.sub("", head)
    head = "".join(c for c in head if c.isprintable() or c == " ")
    head = unicodedata.normalize("NFKC", head)  # (superscript, fullwidth digits: ASCII)
    head = DIGIT_RUN.sub(MASK, head).strip()
    if len(head) > limit:
        head = head[: limit - 1].rstrip() + "…"
    return head
