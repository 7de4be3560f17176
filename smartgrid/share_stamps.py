"""The DEBUG lines that time-stamp a share on the move, defined once for the services that log
them (the balancer's allocator, the substation) and bench.share_trace, which reads them back.

Each is the %-format the service logs with; :func:`pattern` derives the regular expression
that finds it in a log, so the two cannot drift apart.
"""

from __future__ import annotations

import re

#: The allocator received a substation's ``power.demand`` report: substation, sent, received.
REPORT_RECEIVED = "report from %s at %.6f received at %.6f"
#: The allocator issued a grant: substation, share (kW), issued.
GRANT_ISSUED = "grant to %s of %.3f kW issued at %.6f"
#: A substation received its share: share (kW), issued, received.
SHARE_RECEIVED = "share of %.3f kW issued at %.6f received at %.6f"

#: What each conversion the formats use reads back as: a word, a decimal number.
_FIELDS = {"%s": r"(\S+)", "%f": r"([\d.]+)"}
_CONVERSION = re.compile(r"%(?:\.\d+)?[a-z%]")


def pattern(line_format: str) -> re.Pattern[str]:
    """The expression that finds a line logged with ``line_format``, a group per field."""
    parts = _CONVERSION.split(line_format)
    conversions = _CONVERSION.findall(line_format)
    fields = []
    for conversion in conversions:
        kind = re.sub(r"\.\d+", "", conversion)
        if kind not in _FIELDS:
            raise ValueError(f"{conversion!r} in {line_format!r}: no pattern for it")
        fields.append(_FIELDS[kind])
    return re.compile(
        "".join(re.escape(part) + field for part, field in zip(parts, [*fields, ""], strict=True))
    )
