"""Follows the lifecycle events during a load run: the ledger of what happened to each request.

It learns from the substations' own ``session.started``/``session.completed`` events, with
their timestamps, so the load of every substation over time is reconstructed exactly rather
than sampled by scraping, and every request's fate (completed once, twice, never) is known.
From ``substation.announced`` it learns each substation's capacity (its charging points), and
it keeps a running count of each substation's active sessions for the live view.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from smartgrid import contract
from smartgrid.amqp import ConsumerSpec, Delivery, Link
from smartgrid.config import declare_topology_setting
from smartgrid.events import events_in
from smartgrid.senders import DEFAULT_EVENT_SENDERS, Senders, event_senders_setting


@dataclass(frozen=True)
class ObserverConfig:
    """The observer's broker settings, the same variables as the services'."""

    declare_topology: bool = declare_topology_setting()
    event_senders: tuple[str, ...] = event_senders_setting()


@dataclass
class RequestFate:
    routed_to: list[str] = field(default_factory=list)
    started: list[contract.SessionStarted] = field(default_factory=list)
    completed: list[contract.SessionCompleted] = field(default_factory=list)
    dead_lettered: str | None = None


class EventObserver:
    def __init__(
        self,
        amqp_url: str,
        *,
        name: str = "loadgen-observer",
        declare_topology: bool = True,
        event_senders: Iterable[str] = DEFAULT_EVENT_SENDERS,
    ):
        self._lock = threading.Lock()
        self._fates: dict[str, RequestFate] = defaultdict(RequestFate)
        self._capacities: dict[str, int] = {}
        self._active: dict[str, set[str]] = defaultdict(set)  # substation -> request ids charging
        #: Power changes, reports and limit changes, in arrival order (loadgen.power).
        self._power_events: list[contract.Event] = []
        self.link = Link(
            amqp_url,
            name=name,
            topology=contract.topology(contract.core_topology(), declare=declare_topology),
            # Acknowledged once counted: an event on its way when the connection goes comes
            # again (counted once: identical), where auto-ack lost it (a false "unfinished").
            consumers=[
                ConsumerSpec(
                    contract.LOADGEN_EVENTS, self._on_event, prefetch=1000, ack_when_handled=True
                )
            ],
        )
        self.senders = Senders(event_senders, own_user=self.link.user)

    def start(self, timeout: float = 10.0) -> None:
        self.link.start()
        if not self.link.wait_ready(timeout):
            self.link.stop()
            raise ConnectionError(
                "cannot subscribe to lifecycle events: the broker is not reachable"
            )

    def stop(self) -> None:
        self.link.stop()

    def _on_event(self, delivery: Delivery) -> None:
        for event in events_in(delivery, self.senders):
            self._apply(event)

    def _apply(self, event: contract.Event) -> None:
        if isinstance(event, contract.SessionPower | contract.PowerDemand | contract.GridLimit):
            with self._lock:
                self._power_events.append(event)
            return
        if isinstance(event, contract.SubstationAnnounced):
            with self._lock:
                self._capacities[event.substation] = event.capacity
            return
        request_id = getattr(event, "request_id", None)
        if request_id is None:
            return
        with self._lock:
            fate = self._fates[request_id]
            if isinstance(event, contract.RequestRouted):
                fate.routed_to.append(event.substation)
            elif isinstance(event, contract.SessionStarted):
                # Events are published at least once: a publisher that lost its connection
                # before the confirm sends the same event again. An identical event (same
                # instance, same timestamps) is that resend, not a second session.
                if event not in fate.started:
                    fate.started.append(event)
                self._active[event.substation].add(request_id)
            elif isinstance(event, contract.SessionCompleted):
                if event not in fate.completed:
                    fate.completed.append(event)
                self._active[event.substation].discard(request_id)
            elif isinstance(event, contract.RequestDeadLettered):
                fate.dead_lettered = event.reason

    def fates(self, request_ids: list[str]) -> dict[str, RequestFate]:
        with self._lock:
            return {rid: self._fates.get(rid, RequestFate()) for rid in request_ids}

    def settled(self, request_ids: list[str]) -> int:
        """How many of ``request_ids`` have completed or been dead-lettered."""
        with self._lock:
            return sum(
                1
                for rid in request_ids
                if rid in self._fates
                and (self._fates[rid].completed or self._fates[rid].dead_lettered)
            )

    def power_events(self) -> list[contract.Event]:
        with self._lock:
            return list(self._power_events)

    def capacities(self) -> dict[str, int]:
        """Charging points of every substation heard announcing itself so far."""
        with self._lock:
            return dict(self._capacities)

    def active_sessions(self) -> dict[str, int]:
        """Sessions charging now at each substation seen so far (from started/completed)."""
        with self._lock:
            return {substation: len(ids) for substation, ids in self._active.items()}
