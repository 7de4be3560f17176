"""A substation's power on /metrics, in the contract's names (``contract.POWER_METRIC`` ...)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from smartgrid import contract
from smartgrid.power import kilowatts
from substation.sharing import PowerSharing


class PowerCollector(Collector):
    def __init__(self, sharing: PowerSharing, clock: Callable[[], float] = time.time) -> None:
        self._sharing = sharing
        self._clock = clock

    def collect(self) -> Iterator:
        reading = self._sharing.reading(self._clock())
        labels = ["substation"]
        values = [self._sharing.substation]

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, text, labels=labels)
            family.add_metric(values, value)
            return family

        yield gauge(
            contract.POWER_METRIC, "Power its sessions draw now (kW)", kilowatts(reading.power_w)
        )
        yield gauge(
            contract.POWER_LIMIT_METRIC,
            "Power its sessions may draw now (kW): its own limit, the lower of that and its "
            "share of its parent's limit, or its failsafe once the share's lease ran out",
            kilowatts(reading.limit_w),
        )
        yield gauge(
            contract.POWER_DEMAND_METRIC,
            "Power its sessions would draw unconstrained: the sum of their cars' maxima (kW)",
            kilowatts(reading.demand_w),
        )
        energy = CounterMetricFamily(
            contract.ENERGY_METRIC,
            "Energy its sessions delivered, in simulated kWh (SIMULATED_HOUR_SECONDS)",
            labels=labels,
        )
        energy.add_metric(values, reading.energy_kwh)
        yield energy
        paused = GaugeMetricFamily(
            contract.PAUSED_METRIC,
            "Sessions at 0 kW because their minimum did not fit, per priority class (they keep "
            "their charging point and resume first)",
            labels=[*labels, contract.PRIORITY_LABEL],
        )
        for priority, count in reading.paused.items():
            paused.add_metric([*values, priority.value], count)
        yield paused
        if reading.lease_expires_in is not None:
            yield gauge(
                contract.LEASE_METRIC,
                "Seconds until its share of its parent's limit runs out (at or below 0: it draws "
                "at most its failsafe); only on a substation under a grid node",
                reading.lease_expires_in,
            )
