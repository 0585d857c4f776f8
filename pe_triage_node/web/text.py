"""How the console writes values: person names, ages, durations, times, sizes; tolerant JSON reading.

Template filters (registered in :func:`pe_triage_node.web.app.create_app`) and
the helpers the page modules share. Finding and label wording is not here: it
comes from :mod:`pe_triage_node.export.findings`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

_AS_RE = re.compile(r"\s*(\d{1,3})\s*([DWMY])\s*")


def format_person_name(pn: str | None) -> str:
    """DICOM PN ``FAMILY^GIVEN^MIDDLE`` as ``FAMILY, Given Middle`` (alphabetic group only)."""
    if not pn:
        return ""
    parts = pn.split("=")[0].split("^")
    family = parts[0].strip()
    rest = " ".join(p.strip() for p in parts[1:3] if p.strip())
    return f"{family}, {rest}" if rest else family


def format_age(age: str | None) -> str:
    """DICOM AS ``043Y`` as ``43 y`` (days, weeks, months: d, w, m)."""
    m = _AS_RE.fullmatch(age or "")
    return f"{int(m[1])} {m[2].lower()}" if m else (age or "").strip()


def format_duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``; empty for an unknown or negative duration."""
    if seconds is None or seconds < 0:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def format_time(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if value else ""


def format_probability(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "–"


def format_bytes(value: int | None) -> str:
    if value is None:
        return "?"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_ago(value: dt.datetime | None) -> str:
    if value is None:
        return "never"
    s = int((dt.datetime.now(dt.timezone.utc) - value).total_seconds())
    if s < 90:
        return f"{s} s ago"
    if s < 5400:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago"


def json_value(text: str | None, default: Any) -> Any:
    """``text`` parsed as JSON when it holds a value of ``default``'s type, else ``default`` (never raises)."""
    try:
        value = json.loads(text or "")
    except (json.JSONDecodeError, TypeError):
        return default
    return value if isinstance(value, type(default)) else default


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None
