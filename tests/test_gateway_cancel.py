"""DELETE /charge/<id> through the whole local stack: a charging session stops, its point is
free again, and the request ends ``cancelled``, as every gateway's history says."""

from __future__ import annotations

import dataclasses

from smartgrid import contract
from stack.local import StackSettings, start_stack
from tests.helpers import eventually, http_json, metric


def _call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    status, _headers, answer = http_json(url, method, body, timeout=10)
    return status, answer


def test_cancelling_a_charging_session_frees_its_point_and_ends_it_cancelled(
    stack_settings: StackSettings,
):
    settings = dataclasses.replace(stack_settings, substations=1, session_seconds=120)
    group = start_stack(settings, timeout=60)
    base = settings.gateway_url
    load_url = f"http://{settings.host}:{settings.substation_port(0)}/metrics"
    (substation,) = settings.substation_ids()

    def load() -> float:
        return metric(load_url, contract.LOAD_METRIC, substation=substation) or 0

    try:
        status, accepted = _call(f"{base}/charge", "POST", {"ev_id": "EV-LEAVING"})
        assert status == 202
        location = f"{base}/charge/{accepted['request_id']}"
        eventually(lambda: _call(location)[1]["status"] == "charging", what="charging")
        assert load() == 1

        status, record = _call(location, "DELETE")
        assert status == 202 and record["cancel_requested_at"] > 0
        eventually(lambda: load() == 0, timeout=10, what="the charging point free")
        final = eventually(
            lambda: (r := _call(location)[1])["status"] == "cancelled" and r,
            what="the request cancelled",
        )
        assert final["substation"] == substation and final["started_at"] > 0
        # Harmless again; the EV may charge anew.
        assert _call(location, "DELETE")[0] == 202
        assert _call(f"{base}/charge", "POST", {"ev_id": "EV-LEAVING"})[0] == 202
    finally:
        group.stop()
