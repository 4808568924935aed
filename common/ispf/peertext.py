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
# 9 or more digits (\d: any script's), single dashes or spaces between allowed,
# so `35202-1234567-1` is caught as well as `3520212345671`.
_DIGIT_RUN = re.compile(r"\d(?:[-\s]?\d){8,}")


# In an id (a UUID, a request id: hex and dashes) digit runs are common by chance;
# only a whole ID number is masked there: 13 digits in a row, or dashed as an ID
# is written. (No UUID or request id group is that long.)
_ID_DIGIT_RUN = re.compile(r"\d{13,}|\d{5}-\d{7}-\d")


def untrusted_id(text: str, limit: int = 64) -> str:
    """A session or request id from a peer, as it may be logged: `untrusted`, except
    that only an ID number (13 digits in a row, or `NNNNN-NNNNNNN-N`) is masked, so
    a UUID or request id always stays readable."""
    head = _ESCAPE.sub("", text[: 4 * limit + 64])
    head = "".join(c for c in head if c.isprintable())
    head = _ID_DIGIT_RUN.sub(MASK, unicodedata.normalize("NFC", head)).strip()
    return head if len(head) <= limit else head[: limit - 1] + "…"


def untrusted(text: str, limit: int = MAX_PEER_TEXT) -> str:
    """`text` from a peer as it may be logged, echoed or stored (at most `limit` chars).

    The result is printable, holds no run of 9+ digits and is NFC-normalised.
    Empty when nothing printable is left.
    """
    head = text[: 4 * limit + 64]  # (bounded work; a run cut here is still long)
    head = _ESCAPE.sub("", head)
    head = "".join(c for c in head if c.isprintable() or c == " ")
    head = unicodedata.normalize("NFC", head)
    head = _DIGIT_RUN.sub(MASK, head).strip()
    if len(head) > limit:
        head = head[: limit - 1].rstrip() + "…"
    return head
