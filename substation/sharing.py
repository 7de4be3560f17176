"""How a substation shares its power among its sessions over time (pure: times are arguments).

The substation's sessions may draw together at most the *limit in force*: its own limit
(``SUBSTATION_POWER_LIMIT_KW``, lowered to the topology file's rating of it), or, while it is
*managed*, the lower of that and the share it holds (``power.share``), or its failsafe
(``SUBSTATION_FAILSAFE_KW``) once that share's lease has run out. :meth:`PowerSharing.reshare`
shares that limit among the sessions with :func:`smartgrid.power.allocate` (classes first,
each session its minimum or paused, the rest water-filled), and is called on every change of
the sessions or the limit: a start, an end, a grant, a lease running out. Each session's
energy is integrated exactly between changes (:class:`smartgrid.power_request.SessionEnergy`),
so a curtailed session ends later and a paused one (0 kW, keeping its point) not at all until
it resumes.

**Managed or not.** A substation is managed from the start when it knows a parent
(``SUBSTATION_PARENT``, or the topology file places it under a node): it then fails closed,
drawing at most its failsafe until the allocator's first grant arrives, because the allocator
counts a substation it has not granted anything yet at its failsafe. A substation that knows
no parent is a root of its own and draws its own limit, as every substation did before power
sharing, so a deployment without an allocator (count-only) is exactly as before. If it
receives a grant anyway (an allocator that places it under a node, or grants a root an
operator's override), it becomes managed for the rest of its life: a share and its lease
bind it from then on, and the failsafe once the lease runs out.

Thread-safety: the I/O thread changes the state and the HTTP thread serving /metrics reads a
:class:`PowerReading`; one lock keeps each reading to one instant.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from smartgrid.leases import Demand, DemandReport, Grant, LeaseHolder
from smartgrid.power import CLASS_ORDER, Priority, SessionDemand, allocate
from smartgrid.power_request import PowerFields, SessionEnergy, energy_kwh

#: Every point at a car's maximum: the default limit never binds (smartgrid.power.MAX_CAR_KW).
UNBINDING_KW_PER_POINT = 350.0
#: A session end timer that fires this close to the end counts as the end (timers and the
#: wall clock differ by a little).
END_TOLERANCE_SECONDS = 0.01


@dataclass(frozen=True)
class Change:
    """A session's power changed (or was set for the first time: ``started``)."""

    request_id: str
    power_w: int
    #: When its energy will have been delivered at this power; None while paused.
    expected_end: float | None
    #: Its first allocation: announced by ``session.started``, later ones by ``session.power``.
    started: bool = False


@dataclass(frozen=True)
class Ended:
    """What a session delivered, and how long it was paused in all."""

    energy_kwh: float
    paused_seconds: float


@dataclass(frozen=True)
class PowerReading:
    """The substation's power at one instant, for /metrics."""

    power_w: int
    limit_w: int
    demand_w: int
    energy_kwh: float
    paused: Mapping[Priority, int]
    #: Seconds its lease has to run (below 0: expired that long ago; 0: none received yet);
    #: None for a substation that is not managed.
    lease_expires_in: float | None


@dataclass
class _Session:
    demand: SessionDemand
    energy: SessionEnergy
    started: bool = False
    paused_since: float | None = None
    paused_seconds: float = 0.0

    def set_power(self, power_w: int, now: float) -> None:
        self.energy.set_power(power_w, now)
        if power_w == 0 and self.paused_since is None:
            self.paused_since = now
        elif power_w > 0 and self.paused_since is not None:
            self.paused_seconds += max(0.0, now - self.paused_since)
            self.paused_since = None

    def paused_for(self, now: float) -> float:
        running = 0.0 if self.paused_since is None else max(0.0, now - self.paused_since)
        return self.paused_seconds + running

    def expected_end(self, now: float) -> float | None:
        end = self.energy.expected_end(now)
        return None if math.isinf(end) else end


def default_limit_kw(capacity: int) -> float:
    """The limit that never binds: every charging point at a car's highest power."""
    return capacity * UNBINDING_KW_PER_POINT


class PowerSharing:
    def __init__(
        self,
        substation: str,
        *,
        limit_w: int,
        failsafe_w: int,
        parent: str | None,
        session_seconds: float,
        hour_seconds: float,
        started_at: float,
        skew_seconds: float,
        guaranteed: Mapping[Priority, Fraction | float] | None = None,
    ) -> None:
        self.substation = substation
        self.parent = parent
        self.session_seconds = session_seconds
        self.hour_seconds = hour_seconds
        self.guaranteed = guaranteed
        self.lease = LeaseHolder(
            limit_w,
            failsafe_w,
            managed=parent is not None,
            started_at=started_at,
            skew_seconds=skew_seconds,
        )
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        #: The sessions not at their maximum (paused, curtailed, or not started yet): while the
        #: limit covers every maximum, the only ones a re-share can change. Kept as they
        #: change, so that a start or an end costs the same whatever the sessions running.
        self._below_max: dict[str, _Session] = {}
        #: False: every re-share runs the full allocation over every session (the reference
        #: the tests hold the shortcut to).
        self.incremental = True
        #: Per class (CLASS_ORDER), every session's (min_w, max_w), sorted, and the sums of
        #: their minimums and of their maximums; with the power drawn, kept as sessions come,
        #: go and change power, so that a report costs a copy of them rather than a pass over
        #: every session (docs/benchmarks.md §4).
        self._bounds: list[list[tuple[int, int]]] = [[] for _ in CLASS_ORDER]
        self._floors_w = [0 for _ in CLASS_ORDER]
        self._wants_w = [0 for _ in CLASS_ORDER]
        self._power_w = 0
        self._admitted = 0
        #: Energy of the sessions that ended (the counter adds the running ones' so far).
        self._energy_done_kwh = 0.0
        self._limit_in_force_w = self.lease.limit_w(started_at)
        #: How much of the limit in force the sessions could not take, at the last report.
        self._reported_unused_w = 0
        #: Part of the share given back (``LeaseHolder.release``) since the last report.
        self._release_unreported = False

    # ------------------------------------------------------------------ changes (I/O thread)
    def add(self, request_id: str, fields: PowerFields, now: float) -> None:
        """A session starts at ``now`` (its power is set by the next :meth:`reshare`)."""
        energy = energy_kwh(
            fields, session_seconds=self.session_seconds, hour_seconds=self.hour_seconds
        )
        with self._lock:
            if request_id in self._sessions:
                raise ValueError(f"session {request_id!r} is running already")
            self._admitted += 1
            demand = SessionDemand(
                request_id, fields.min_w, fields.max_w, fields.priority, self._admitted
            )
            session = _Session(
                demand, SessionEnergy(energy, hour_seconds=self.hour_seconds, now=now)
            )
            self._sessions[request_id] = session
            self._below_max[request_id] = session
            rank = demand.priority.rank
            bisect.insort(self._bounds[rank], (demand.min_w, demand.max_w))
            self._floors_w[rank] += demand.min_w
            self._wants_w[rank] += demand.max_w

    def remove(self, request_id: str, now: float) -> Ended | None:
        """A session ends at ``now`` (its energy delivered, cancelled, or dropped); None if it
        is not running here. Call :meth:`reshare` after: its power is free for the others."""
        with self._lock:
            session = self._sessions.pop(request_id, None)
            if session is None:
                return None
            self._below_max.pop(request_id, None)
            demand = session.demand
            rank = demand.priority.rank
            bounds = self._bounds[rank]
            del bounds[bisect.bisect_left(bounds, (demand.min_w, demand.max_w))]
            self._floors_w[rank] -= demand.min_w
            self._wants_w[rank] -= demand.max_w
            self._power_w -= session.energy.power_w
            delivered = session.energy.delivered_kwh(now)
            self._energy_done_kwh += delivered
            return Ended(delivered, session.paused_for(now))

    def offer(self, grant: Grant, now: float) -> bool:
        """A share from the allocator; True if taken (then :meth:`reshare`)."""
        with self._lock:
            if grant.substation != self.substation or not self.lease.offer(grant, now):
                return False
            self.lease.managed = True
            return True

    def reshare(self, now: float) -> list[Change]:
        """Share the limit in force at ``now`` among the sessions; the sessions whose power
        changed (and every new one), in the order they are served."""
        with self._lock:
            self._limit_in_force_w = self.lease.limit_w(now)
            wanted_w = self._wanted_w
            if (
                self.parent is not None
                and wanted_w < self._limit_in_force_w
                and self.lease.release(wanted_w, now)
            ):
                # The sessions leave part of the share unused: give it back now, so that the
                # allocator can hand it to others on the next report instead of lowering this
                # share first and waiting for the acknowledgement. The allocator would lower
                # it to no more than this (what the sessions want, at least the failsafe)
                # anyway. Not for a root (its share is its whole limit, whatever it wants).
                self._limit_in_force_w = self.lease.limit_w(now)
                self._release_unreported = True
            sessions: Iterable[_Session]
            if self.incremental and wanted_w <= self._limit_in_force_w:
                # The limit covers every session's maximum, which is then what allocate gives
                # each (guaranteed shares or not): only a new or a curtailed session changes.
                # The commonest case by far (the default limit never binds), and allocate's
                # sorting and water-filling on every start and end was 40% of a substation's
                # CPU under load, then a scan of every session for those below their maximum
                # 46% (docs/benchmarks.md §4): they are kept as a set instead.
                sessions = list(self._below_max.values())
                power: Mapping[str, int] = {s.demand.session: s.demand.max_w for s in sessions}
            else:
                sessions = self._sessions.values()
                power = allocate(
                    self._limit_in_force_w, (s.demand for s in sessions), self.guaranteed
                ).power_w
            changes = []
            for session in sorted(sessions, key=lambda s: s.demand.order):
                request_id = session.demand.session
                power_w = power[request_id]
                if power_w == session.demand.max_w:
                    self._below_max.pop(request_id, None)
                else:
                    self._below_max[request_id] = session
                if session.started and power_w == session.energy.power_w:
                    continue
                first = not session.started
                session.started = True
                self._power_w += power_w - session.energy.power_w
                session.set_power(power_w, now)
                changes.append(Change(request_id, power_w, session.expected_end(now), first))
            return changes

    # ------------------------------------------------------------------ questions
    def __contains__(self, request_id: str) -> bool:
        return request_id in self._sessions

    def due(self, request_id: str, now: float) -> float | None:
        """When the session's energy will be delivered, if not by ``now`` (give or take
        :data:`END_TOLERANCE_SECONDS`); None if it is delivered, or not running here."""
        with self._lock:
            session = self._sessions.get(request_id)
            if session is None:
                return None
            end = session.energy.expected_end(now)
            return end if end > now + END_TOLERANCE_SECONDS else None

    def report_at_once(self) -> bool:
        """Whether a change should be reported now rather than within DEMAND_MIN_INTERVAL:
        while the share binds (its sessions want more than it: a new one shares it with the
        others until the allocator moves power here), and when the sessions leave more of it
        unused than the last report said (a session ended and the others are at their
        maximum: power another substation could use), or when it gave part of the share back
        (:meth:`reshare`). Either way power is lost or unfairly shared until the allocator
        knows. Never for a substation that is not managed (no share: a count-only deployment
        keeps the interval)."""
        with self._lock:
            if not self.lease.managed:
                return False
            binds = self._wanted_w > self._limit_in_force_w
            unused = self._unused_w() > self._reported_unused_w
            return binds or unused or self._release_unreported

    @property
    def _wanted_w(self) -> int:
        """What the sessions would draw at their maximum, together."""
        return sum(self._wants_w)

    def _unused_w(self) -> int:
        return max(0, self._limit_in_force_w - self._wanted_w)

    def lease_expires_at(self, now: float) -> float | None:
        """When the share in force runs out (re-share then), if one is."""
        with self._lock:
            return self.lease.expires_at(now) if self.lease.managed else None

    def report(self, now: float) -> tuple[DemandReport, int, int]:
        """What to tell the allocator: the demand report, the limit in force and the power
        drawn (the rest of ``power.demand``)."""
        with self._lock:
            self._reported_unused_w = self._unused_w()
            bounds = tuple(tuple(b) for b in self._bounds)
            self._release_unreported = False
            report = DemandReport(
                substation=self.substation,
                at=now,
                limit_w=self.lease.own_limit_w,
                # What Demand.of_sessions counts over the sessions (tests hold it to that).
                demand=Demand(
                    tuple(len(b) for b in bounds),
                    tuple(self._floors_w),
                    tuple(self._wants_w),
                    self.lease.failsafe_w,
                    bounds,
                ),
                parent=self.parent,
                holding=self.lease.holding(now),
                last_key=self.lease.last_key,
                released_w=self.lease.released_w,
            )
            return report, self._limit_in_force_w, self._power_w

    def reading(self, now: float) -> PowerReading:
        with self._lock:
            sessions = list(self._sessions.values())
            paused = dict.fromkeys(CLASS_ORDER, 0)
            for s in sessions:
                if s.started and s.energy.power_w == 0:
                    paused[s.demand.priority] += 1
            lease_expires_in = None
            if self.lease.managed:
                lease_expires_in = 0.0
                grant = self.lease.last_grant
                if grant is not None:
                    lease_expires_in = grant.until - now
            return PowerReading(
                power_w=sum(s.energy.power_w for s in sessions),
                limit_w=self._limit_in_force_w,
                demand_w=sum(s.demand.max_w for s in sessions),
                energy_kwh=self._energy_done_kwh
                + sum(s.energy.delivered_kwh(now) for s in sessions),
                paused=paused,
                lease_expires_in=lease_expires_in,
            )
