"""bench.message_audit's arithmetic and grouping, on made-up counters (no broker)."""

from __future__ import annotations

import pytest

from bench import message_audit
from smartgrid import contract


def test_each_subscribers_queues_are_one_row_and_the_shared_ones_their_own() -> None:
    assert message_audit.family("smartgrid.balancer-events.balancer-host-1a2b3c") == (
        "smartgrid.balancer-events.*"
    )
    assert message_audit.family("smartgrid.substation.substation-2") == "smartgrid.substation.*"
    assert message_audit.family("smartgrid.substation-events.substation-2-x") == (
        "smartgrid.substation-events.*"
    )
    assert message_audit.family(contract.PENDING_QUEUE) == contract.PENDING_QUEUE
    assert message_audit.family(contract.HISTORY_STREAM) == contract.HISTORY_STREAM


def test_a_connection_belongs_to_the_service_that_named_it() -> None:
    assert message_audit.service_of("gateway-4242") == "gateway"
    assert message_audit.service_of("balancer-host-1a2b3c") == "balancer"
    assert message_audit.service_of("balancer-host-1a2b3c-allocator") == "balancer allocator"
    assert message_audit.service_of("substation-substation-1") == "substation"
    assert message_audit.service_of("") == "?"


def _audit(stored_at_rest: int, stored_under_load: int) -> dict:
    def phase(seconds: float, stored: int) -> dict:
        return {
            "seconds": seconds,
            "queues": {contract.POWER_REPORTS_QUEUE: {"publish": stored, "deliver_get": stored}},
            "exchanges": {},
            "services": {},
            "event_messages": {"power.demand": stored},
            "events": {"power.demand": stored},
        }

    return {
        "revision": None,
        "rate": 100.0,
        "accepted": 1000,
        "queue_types": {contract.POWER_REPORTS_QUEUE: "quorum"},
        "queue_members": {contract.POWER_REPORTS_QUEUE: 1},
        "channels": {},
        "rest": phase(30.0, stored_at_rest),
        "load": phase(10.0, stored_under_load),
        "cpu_seconds": {"rest": {"rabbitmq": 0.3}, "load": {"rabbitmq": 2.1}},
    }


def test_per_request_is_what_the_load_added_beyond_the_rest_rate() -> None:
    # 3 a second at rest, so 30 of the load phase's 10 s are the rest's; 130 more over 1,000
    # requests.
    audit = _audit(stored_at_rest=90, stored_under_load=160)
    assert message_audit.per_second(audit, "queues", contract.POWER_REPORTS_QUEUE, "publish") == 3
    assert message_audit.per_request(
        audit, "queues", contract.POWER_REPORTS_QUEUE, "publish"
    ) == pytest.approx(0.13)
    report = message_audit.report(audit)
    assert f"| {contract.POWER_REPORTS_QUEUE} | quorum | 1 | 0.13 | 0.13 |" in report
    assert "| power.demand | 0.13 | 0.13 | 3.00 | 3.00 |" in report
