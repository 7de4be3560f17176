"""The history repaired from those who know: real processes on the real broker, with the
stream made to miss messages it would have been sent (unbound for a moment), as a stream can
lose what it confirmed when its leader's node fails (rabbitmq-server#9457, gateway/doubts.py).

* A session's end that never reached the stream: the gateway asks (``request.status_requested``)
  once the request stands still, and the substation publishes the same completion again.
* A request that never reached the stream: the gateway that accepted it sends a copy to the
  stream alone, so that a gateway started later knows it too.
"""

from __future__ import annotations

import dataclasses

from smartgrid import contract
from stack.local import StackSettings, gateway_process, start_stack
from tests.helpers import BrokerClient, eventually, http_json, metric
from tests.ports import free_ports


def _settings(stack_settings: StackSettings) -> StackSettings:
    return dataclasses.replace(
        stack_settings,
        substations=1,
        session_seconds=1.0,
        poll_interval=0.5,
        extra_env={"STATUS_CHECK_AFTER": "1", "HISTORY_COPY_AFTER": "1"},
    )


def test_a_completion_the_stream_missed_is_told_again_when_the_gateway_asks(stack_settings):
    settings = _settings(stack_settings)
    observer = BrokerClient(settings.amqp_url)
    group = start_stack(settings)
    try:
        kind = contract.SessionCompleted.kind
        observer.channel.queue_unbind(contract.HISTORY_STREAM, contract.EVENTS_EXCHANGE, kind)
        status, _, body = http_json(f"{settings.gateway_url}/charge", "POST", {"ev_id": "EV-LOST"})
        assert status == 202, body
        request_id = body["request_id"]
        substation_metrics = f"http://{settings.host}:{settings.substation_port(0)}/metrics"
        eventually(
            lambda: (
                metric(
                    substation_metrics,
                    "substation_sessions_completed_total",
                    substation="substation-1",
                )
                == 1
            ),
            what="the session completed at the substation",
        )
        *_, record = http_json(f"{settings.gateway_url}/charge/{request_id}")
        assert record["status"] == "charging", record  # its end never reached the history
        observer.channel.queue_bind(contract.HISTORY_STREAM, contract.EVENTS_EXCHANGE, kind)
        eventually(
            lambda: (
                http_json(f"{settings.gateway_url}/charge/{request_id}")[2]["status"] == "completed"
            ),
            timeout=30,
            what="the completion told again",
        )
        log = (settings.log_dir / "substation-1.log").read_text()
        assert f"session.completed of {request_id} published again" in log
    finally:
        group.stop()
        observer.close()


def test_a_request_the_stream_missed_is_copied_to_it_by_the_gateway_that_accepted_it(
    stack_settings,
):
    settings = _settings(stack_settings)
    observer = BrokerClient(settings.amqp_url)
    group = start_stack(settings)
    later = None
    try:
        key = contract.REQUEST_ROUTING_KEY
        observer.channel.queue_unbind(contract.HISTORY_STREAM, contract.REQUESTS_EXCHANGE, key)
        status, _, body = http_json(f"{settings.gateway_url}/charge", "POST", {"ev_id": "EV-COPY"})
        assert status == 202, body
        request_id = body["request_id"]
        observer.channel.queue_bind(contract.HISTORY_STREAM, contract.REQUESTS_EXCHANGE, key)
        eventually(
            lambda: (
                "was not read back from the history: sent again"
                in (settings.log_dir / "gateway.log").read_text()
            ),
            timeout=30,
            what="the accepting gateway sending a copy",
        )
        # A gateway started now knows the request from the stream alone.
        port = free_ports(1)[0]
        other = dataclasses.replace(settings, gateway_port=port, log_dir=settings.log_dir / "2")
        later = gateway_process(other).start()
        later.wait_healthy(60)
        eventually(
            lambda: (
                http_json(f"{other.gateway_url}/charge/{request_id}")[2].get("status")
                == "completed"
            ),
            timeout=30,
            what="the request known to a gateway started later",
        )
    finally:
        if later is not None:
            later.stop()
        group.stop()
        observer.close()
