"""A log line's %-format, defined once, read back: the services log with the format, and what
reads their logs (bench.share_trace, the tests of gateway processes) finds the line with
:func:`pattern`, so that a changed message cannot silently blind what reads it."""

from __future__ import annotations

import re

#: What each conversion the formats use reads back as: a word, a decimal number, an integer.
_FIELDS = {"%s": r"(\S+)", "%f": r"([\d.]+)", "%d": r"(-?\d+)"}
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
