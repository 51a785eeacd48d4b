"""Per-row schema and range checks of a batch index (plain Python: no NumPy or OpenCV,
which only the image screens need)."""

from __future__ import annotations

import functools
import re
from datetime import datetime, timedelta, timezone
from typing import Any

_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
EARLIEST_CAPTURE = datetime(1990, 1, 1, tzinfo=timezone.utc)


def validate_row(fields: dict[str, Any], n_classes: int, now: datetime,
                 required: tuple[str, ...], skew: timedelta = timedelta(minutes=10)) -> list[str]:
    """Reason codes for one index row (empty list: the row is well-formed and in range)."""
    reasons = []
    missing = [f for f in required if f not in fields or fields[f] in (None, "")]
    extra = [f for f in fields if f not in required]
    if missing:
        reasons.append("INDEX_MISSING_FIELD")
    if extra:
        reasons.append("INDEX_EXTRA_FIELD")
    sid = fields.get("id")
    if "id" not in missing and not (isinstance(sid, str) and _ID_RE.match(sid)):
        reasons.append("BAD_ID")
    sha = fields.get("sha256")
    if "sha256" not in missing and not (isinstance(sha, str) and _HEX_RE.match(sha)):
        reasons.append("BAD_SHA256")
    label = fields.get("label")
    if "label" not in missing:
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)  # CSV carries numbers as text
        if isinstance(label, bool) or not isinstance(label, int):
            reasons.append("BAD_LABEL_TYPE")
        elif not 0 <= label < n_classes:
            reasons.append("LABEL_OUT_OF_RANGE")
    if "capture_time" not in missing:
        code = _capture_time_reason(str(fields.get("capture_time")), now, skew)
        if code:
            reasons.append(code)
    return reasons


@functools.lru_cache(maxsize=256)  # a batch's rows mostly share a few capture times
def _capture_time_reason(text: str, now: datetime, skew: timedelta) -> str:
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return "CAPTURE_TIME_UNPARSABLE"
    if ts.tzinfo is None or ts.utcoffset() != timedelta(0):
        return "CAPTURE_TIME_NOT_UTC"
    if ts > now + skew:
        return "CAPTURE_TIME_FUTURE"
    if ts < EARLIEST_CAPTURE:
        return "CAPTURE_TIME_TOO_OLD"
    return ""


def row_label(fields: dict[str, Any]) -> int:
    return int(fields["label"])
