"""Which other substations are live, as far as their announcements tell.

A substation trusts a claim about a request (``session.lookup``: "I may charge it") or an
answer about one (``session.lookup_reply``) only from a substation on this roster: one that
announced itself within ``live_for`` seconds and has not said it is leaving since. A claim by
an unknown name ("nobody") or by a substation that has gone silent is ignored. Pure: the
caller gives the time.
"""

from __future__ import annotations

from dataclasses import dataclass

from smartgrid import contract


@dataclass
class _Member:
    instance: str
    announced_at: float
    leaving: bool = False


class Roster:
    def __init__(self, *, live_for: float) -> None:
        self.live_for = live_for
        self._members: dict[str, _Member] = {}

    def announced(self, event: contract.SubstationAnnounced, now: float) -> bool:
        """Record an announcement; True if it is from an instance not on the roster yet
        (which then has yet to hear of the others)."""
        member = self._members.get(event.substation)
        if member is not None and member.instance == event.instance:
            if not member.leaving:  # an instance that said it is leaving does not come back
                member.announced_at = now
            return False
        self._members[event.substation] = _Member(event.instance, now)
        return True

    def leaving(self, event: contract.SubstationLeaving) -> None:
        member = self._members.get(event.substation)
        if member is not None and member.instance == event.instance:
            member.leaving = True

    def is_live(self, substation: str, now: float) -> bool:
        member = self._members.get(substation)
        return (
            member is not None and not member.leaving and now - member.announced_at <= self.live_for
        )

    def forget_silent(self, now: float) -> None:
        for substation in [
            s for s, m in self._members.items() if now - m.announced_at > 2 * self.live_for
        ]:
            del self._members[substation]
