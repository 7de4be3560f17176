"""What counts as a number where JSON comes in: the message contract and the HTTP API agree.

JSON allows neither booleans as numbers nor NaN and Infinity, but Python's ``json`` reads
``true`` as a bool (an ``int`` subclass) and ``NaN``/``Infinity`` as floats, and an integer of
hundreds of digits overflows a float. Both the contract's decoder and the gateway's request
fields refuse the same values with the same words; each puts its own name for the field first.
"""

from __future__ import annotations

import math


class NotANumber(ValueError):
    """``str(exc)`` completes a sentence that starts with the field's name."""


def finite_number(value: object) -> float:
    """``value`` as a float, or NotANumber saying why it is not a usable number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NotANumber("must be a number")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        raise NotANumber("is out of range") from None
    if not math.isfinite(number):
        raise NotANumber("must be finite")
    return number
