"""Reading a substation's /metrics page into a :class:`SubstationReading`.

A reading is all or nothing: if any number the balancer needs is missing, unparsable, not
finite, or labelled for another substation, the page is rejected with the reason, and the
substation counts as unknown. It is never read as load 0 (the original design's parsers turned
missing metrics into 0 or infinity, and routed everything to a broken substation).
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from smartgrid import contract


class InvalidReading(ValueError):
    pass


_WANTED = {
    contract.LOAD_METRIC: "load",
    contract.CAPACITY_METRIC: "capacity",
    contract.RECEIVED_METRIC + "_total": "received",
    contract.COMPLETED_METRIC + "_total": "completed",
}


#: The families a reading is made of. Only their lines are parsed: a substation's page also
#: carries a histogram per class and the process's own metrics, which made it ten times
#: longer, and the parser's cost with it (1.4 ms a page, three pages a second at
#: POLL_INTERVAL=1, most of an idle balancer's CPU: issue 16).
_FAMILIES = (
    contract.LOAD_METRIC,
    contract.CAPACITY_METRIC,
    contract.RECEIVED_METRIC,
    contract.COMPLETED_METRIC,
    contract.CONSUMING_METRIC,
    contract.INFO_METRIC,
)


def _needed_lines(text: str) -> str:
    """The lines of ``text`` that name one of :data:`_FAMILIES` (samples, HELP and TYPE)."""
    kept = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith("# ") and line.count(" ") >= 2 else line
        if name.startswith(_FAMILIES):
            kept.append(line)
    return "\n".join(kept) + "\n"


def parse_reading(text: str, substation: str) -> contract.SubstationReading:
    values: dict[str, float] = {}
    instance: str | None = None
    consuming = True
    try:
        families = list(text_string_to_metric_families(_needed_lines(text)))
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on bad input
        raise InvalidReading(f"unparsable metrics page: {exc}") from None
    for family in families:
        for sample in family.samples:
            if sample.labels.get("substation") != substation:
                continue
            if sample.name in _WANTED:
                values[_WANTED[sample.name]] = sample.value
            elif sample.name == contract.CONSUMING_METRIC:
                consuming = sample.value == 1
            elif sample.name == contract.INFO_METRIC and sample.value == 1:
                # "instance": its name in earlier builds, so a mixed fleet keeps working during
                # an upgrade.
                instance = sample.labels.get(contract.INFO_INSTANCE_LABEL) or sample.labels.get(
                    "instance"
                )
    missing = sorted(set(_WANTED.values()) - values.keys())
    if missing:
        raise InvalidReading(f"no {', '.join(missing)} for substation {substation!r} on the page")
    if not instance:
        raise InvalidReading(
            f"no {contract.INFO_METRIC} with an instance for substation {substation!r}"
        )
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise InvalidReading(f"{name} is {value}")
    if values["capacity"] < 1 or not float(values["capacity"]).is_integer():
        raise InvalidReading(f"capacity is {values['capacity']}")
    return contract.SubstationReading(
        substation=substation,
        instance=instance,
        load=values["load"],
        capacity=int(values["capacity"]),
        received=values["received"],
        completed=values["completed"],
        consuming=consuming,
    )
