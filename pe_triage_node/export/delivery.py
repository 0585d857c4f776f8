"""What became of one send: delivered, retry later, or dead (retrying cannot help), with a line a person can read.

Every destination's sender maps its peer's answer to one of these (an MLLP ACK
code, an HTTP status, C-STORE statuses); the exporter turns it into the job's
outcome: complete, fail with backoff, or dead-letter. ``detail`` goes into the
job's history and ``last_error``: UIDs, codes and the peer's own words, never
the payload (it carries patient data).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(str, enum.Enum):
    delivered = "delivered"
    retry = "retry"
    dead = "dead"


@dataclass(frozen=True)
class Delivery:
    outcome: Outcome
    detail: str

    @classmethod
    def delivered(cls, detail: str) -> Delivery:
        return cls(Outcome.delivered, detail)

    @classmethod
    def retry(cls, detail: str) -> Delivery:
        return cls(Outcome.retry, detail)

    @classmethod
    def dead(cls, detail: str) -> Delivery:
        return cls(Outcome.dead, detail)


def http_outcome(status: int) -> Outcome:
    """An HTTP answer: 2xx delivered; 408, 425, 429 and 5xx worth retrying; any other 4xx (and 3xx) dead."""
    if 200 <= status < 300:
        return Outcome.delivered
    if status in (408, 425, 429) or status >= 500:
        return Outcome.retry
    return Outcome.dead
