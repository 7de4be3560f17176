"""bench.profile's sorting of samples by role (bench/profile_roles.py), on stacks as py-spy
writes them."""

from __future__ import annotations

import pytest

from bench.profile_roles import OTHER, by_role

LINK = (
    "Link._run (smartgrid/amqp/link.py:544);IOLoop.start (pika/adapters/select_connection.py:583)"
)
HISTORY = (
    f"{LINK};StreamReader._read (smartgrid/amqp/streams.py:693);"
    "GatewayBroker._on_history (gateway/broker.py:334)"
)
CONFIRM = f"{LINK};Link._on_confirm (smartgrid/amqp/link.py:881)"
HTTP = "main (gateway/__main__.py:92);MPServer._spawn_rsgi_worker (granian/server/mp.py:317)"


def test_a_sample_counts_for_the_first_role_its_stack_holds_weighted_by_its_count():
    shares = dict(by_role("gateway", [f"{HISTORY} 6", f"{CONFIRM} 2", f"{LINK} 1", f"{HTTP} 1"]))
    # The history stream's samples run through the stream reader and pika too: listed first,
    # the history takes them.
    assert shares == pytest.approx(
        {
            "AMQP thread: the history stream, the gateway's handling": 0.6,
            "AMQP thread: confirms": 0.2,
            "AMQP thread: the rest (pika's frames and poll)": 0.1,
            "HTTP event loop (granian: the body, the hand-off, the answer)": 0.1,
        }
    )


def test_a_numbered_service_has_its_kinds_roles_and_unknown_stacks_are_other():
    shares = by_role("substation-3", [f"{CONFIRM} 3", "idle (threading.py:1) 1", "garbage"])
    assert shares == [("confirms", 0.75), (OTHER, 0.25)]
    assert by_role("loadgen", [f"{CONFIRM} 1"]) == [(OTHER, 1.0)]
    assert by_role("gateway", []) == []
