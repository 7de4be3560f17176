"""The power fields of a charge request: validation, defaults, and the energy a session delivers.

``POST /charge`` may carry, beside ``ev_id``:

- ``energy_kwh``: energy to deliver, 0 < x <= 200;
- ``max_kw``: the car's maximum charging power, 1.4 to 350;
- ``min_kw``: the power below which charging is pointless, 1.4 to 350 and at most ``max_kw``;
- ``priority``: ``standard``, ``fleet`` or ``emergency``.

Every field is optional. The defaults (:class:`RequestDefaults`) make a bare ``{"ev_id": ...}``
behave as before power existed: full power (``max_kw``) for exactly ``SESSION_SECONDS``, which
is the energy :func:`energy_kwh` gives it. A default minimum above a car's stated maximum is
lowered to that maximum rather than rejected: the client never sent it.

Time is simulated: ``SIMULATED_HOUR_SECONDS`` real seconds make one hour of charging, so a
30 kWh session at 11 kW takes 2.7 h of simulated time, which is 9.8 s when an hour is 3.6 s.

Errors are :class:`FieldError`, which names the offending field, for the gateway's 422.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from smartgrid.numbers import NotANumber, finite_number
from smartgrid.power import MAX_CAR_KW, MIN_CAR_KW, Priority, watts

MAX_ENERGY_KWH = 200.0
DEFAULT_MAX_KW = 11.0  # a three-phase 16 A wallbox: the commonest AC charging point
DEFAULT_MIN_KW = MIN_CAR_KW  # 6 A on one phase, the IEC 61851 minimum
DEFAULT_HOUR_SECONDS = 3600.0  # real time

POWER_FIELDS = frozenset({"energy_kwh", "max_kw", "min_kw", "priority"})
#: As a client reads them: the default first.
PRIORITY_NAMES = ("standard", "fleet", "emergency")


class FieldError(ValueError):
    """A request field with an unusable value; ``str(exc)`` is the message for the client."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field!r} {detail}")
        self.field = field

    @property
    def code(self) -> str:
        """The ``error`` of the gateway's JSON answer, e.g. ``invalid_max_kw``."""
        return f"invalid_{self.field}"


@dataclass(frozen=True)
class RequestDefaults:
    """What a request that leaves a field out gets (configurable per deployment)."""

    max_kw: float = DEFAULT_MAX_KW
    min_kw: float = DEFAULT_MIN_KW
    priority: Priority = Priority.STANDARD

    def __post_init__(self) -> None:
        # The same rules as a request's own fields, so no default can produce a request that
        # would have been refused had the client sent it.
        _in_range("max_kw", self.max_kw, MIN_CAR_KW, MAX_CAR_KW)
        _in_range("min_kw", self.min_kw, MIN_CAR_KW, MAX_CAR_KW)


@dataclass(frozen=True)
class PowerFields:
    """A request's power fields with every default applied."""

    max_kw: float
    min_kw: float
    priority: Priority
    #: None: deliver what ``max_kw`` gives in ``SESSION_SECONDS`` (see :func:`energy_kwh`).
    energy_kwh: float | None = None

    @property
    def max_w(self) -> int:
        return watts(self.max_kw)

    @property
    def min_w(self) -> int:
        return watts(self.min_kw)

    def message_fields(self) -> dict[str, Any]:
        """The fields a charge request message carries (contract.ChargeRequest's keywords)."""
        return {
            "max_kw": self.max_kw,
            "min_kw": self.min_kw,
            "energy_kwh": self.energy_kwh,
            "priority": self.priority.value,
        }


def _number(field: str, value: object) -> float:
    try:
        return finite_number(value)
    except NotANumber as exc:
        raise FieldError(field, str(exc)) from None


def _in_range(field: str, value: object, low: float, high: float) -> float:
    number = _number(field, value)
    if not low <= number <= high:
        raise FieldError(field, f"must be between {low:g} and {high:g}, got {number:g}")
    return number


def parse_power_fields(
    data: Mapping[str, object], defaults: RequestDefaults = RequestDefaults()
) -> PowerFields:
    """The power fields of a request body (other keys are ignored here), or FieldError."""
    energy = None
    if data.get("energy_kwh") is not None:
        energy = _number("energy_kwh", data["energy_kwh"])
        if not 0 < energy <= MAX_ENERGY_KWH:
            raise FieldError(
                "energy_kwh", f"must be above 0 and at most {MAX_ENERGY_KWH:g}, got {energy:g}"
            )
    max_kw = defaults.max_kw
    if data.get("max_kw") is not None:
        max_kw = _in_range("max_kw", data["max_kw"], MIN_CAR_KW, MAX_CAR_KW)
    if data.get("min_kw") is not None:
        min_kw = _in_range("min_kw", data["min_kw"], MIN_CAR_KW, MAX_CAR_KW)
        if min_kw > max_kw:
            source = "" if "max_kw" in data else ", the default"
            raise FieldError(
                "min_kw", f"must not exceed max_kw ({max_kw:g}{source}), got {min_kw:g}"
            )
    else:
        min_kw = min(defaults.min_kw, max_kw)
    priority = defaults.priority
    if data.get("priority") is not None:
        try:
            priority = Priority(data["priority"])
        except (ValueError, TypeError):
            raise FieldError("priority", f"must be one of {', '.join(PRIORITY_NAMES)}") from None
    return PowerFields(max_kw=max_kw, min_kw=min_kw, priority=priority, energy_kwh=energy)


# ------------------------------------------------------------------------------ energy and time
def energy_kwh(fields: PowerFields, *, session_seconds: float, hour_seconds: float) -> float:
    """The energy a session delivers: the requested amount, or what full power gives in
    ``session_seconds`` of real time (so a request without ``energy_kwh`` lasts as long as
    before, unless it is curtailed)."""
    if fields.energy_kwh is not None:
        return fields.energy_kwh
    return fields.max_kw * session_seconds / hour_seconds


class SessionEnergy:
    """Energy delivered to one session as its power changes; times are the caller's clock.

    Between two power changes the power is constant, so the energy is exact (no sampling): a
    session curtailed to half power takes twice as long, and a paused one (0 W) never ends.
    """

    def __init__(self, energy_kwh: float, *, hour_seconds: float, now: float) -> None:
        if energy_kwh <= 0 or hour_seconds <= 0:
            raise ValueError("energy and the simulated hour must be > 0")
        self.energy_kwh = energy_kwh
        self._hour_seconds = hour_seconds
        self._delivered_kwh = 0.0
        self._power_w = 0
        self._since = now

    @property
    def power_w(self) -> int:
        return self._power_w

    def delivered_kwh(self, now: float) -> float:
        elapsed = max(0.0, now - self._since)
        running = self._power_w / 1000 * elapsed / self._hour_seconds
        return min(self.energy_kwh, self._delivered_kwh + running)

    def set_power(self, power_w: int, now: float) -> None:
        """From ``now`` on the session charges at ``power_w`` (0: paused)."""
        if power_w < 0:
            raise ValueError("power must be >= 0 W")
        self._delivered_kwh = self.delivered_kwh(now)
        self._since = max(now, self._since)
        self._power_w = power_w

    def expected_end(self, now: float) -> float:
        """When the energy will have been delivered at the current power (inf when paused)."""
        remaining = self.energy_kwh - self.delivered_kwh(now)
        if remaining <= 0:
            return now
        if self._power_w == 0:
            return math.inf
        return max(now, self._since) + remaining / (self._power_w / 1000) * self._hour_seconds
