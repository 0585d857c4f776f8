"""Regular expressions written by admins, matched against values that arrived over the network.

A pattern in the selection rules or the priority rules is matched against
DICOM attributes a sender chose (StudyDescription, ConvolutionKernel, ...).
Python's ``re`` cannot be interrupted, so a pattern with catastrophic
backtracking and a crafted value would hold a process for hours. Patterns are
compiled and run with the ``regex`` package instead, each match limited to
:data:`MATCH_TIMEOUT_S`; a match that runs out of time counts as no match and
is logged (without the value, which may identify the patient).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import regex

log = logging.getLogger(__name__)

MATCH_TIMEOUT_S = 0.1


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """The compiled pattern; ``ValueError`` with the reason when it does not compile."""
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc


def search(pattern: str, value: str) -> bool:
    """Whether ``pattern`` is found in ``value`` within :data:`MATCH_TIMEOUT_S` (else False, logged)."""
    try:
        return compile_pattern(pattern).search(value, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        log.warning("regular expression %r ran out of time (%.2f s) on a %d-character value: taken as no match",
                    pattern, MATCH_TIMEOUT_S, len(value))
        return False
