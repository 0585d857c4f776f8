"""Strict DICOM UID validation (PS3.5 9.1): the only values spool paths are built from."""

from __future__ import annotations

import re

from pe_triage_node.errors import InputRejected

# Components: "0" or digits without a leading zero, separated by single dots.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a UID per PS3.5 9.1: ≤ 64 chars, digits and dots, no leading zeros."""
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH and _UID_RE.fullmatch(value) is not None  # fullmatch: no "\n" slips through


def validate_uid(value: object, what: str) -> str:
    """Return ``value`` when it is a valid UID, else raise :class:`InputRejected` naming ``what``."""
    if not isinstance(value, str):
        raise InputRejected(f"{what} missing or not a string")
    if len(value) > MAX_UID_LENGTH:
        raise InputRejected(f"{what} longer than {MAX_UID_LENGTH} characters: {value[:80]!r}")
    if not is_valid_uid(value):
        raise InputRejected(f"{what} is not a valid UID (PS3.5 9.1): {value[:80]!r}")
    return value
