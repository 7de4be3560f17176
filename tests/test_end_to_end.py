"""The whole pipeline as real processes: HTTP in, sessions out, load spread evenly.

The compressed seed scenario (the original test case at one tenth of the time: one EV every
0.2 s for 30 s, sessions of 3 s, polls every 0.5 s) through gateway, balancer and three equal
substations, all talking over the real broker in a private vhost.

The spread bound, and why: with one balancer, its estimate of each substation is exact except
while a lifecycle event is in flight (milliseconds), and the tie-break on the soonest session
end removes the one systematic race (a session ending just after the arrival meant to take its
point). So max - min of active sessions should be <= 1 nearly always; it can reach 2 only for
the few milliseconds an event is late, which a 100 ms sampling grid rarely sees. The test asks
for <= 1 in 90% of samples and never above 2, looser than the 99% measured, so that a loaded CI
machine (late events, slow scheduling) does not fail it while a herding balancer (24% in the
original design's rule) still does.
"""

from __future__ import annotations

import pytest

from loadgen.run import LoadSettings, run_load
from stack.local import StackSettings, start_stack

pytestmark = pytest.mark.slow

SCALE = 0.1


def test_compressed_seed_scenario_completes_every_request_once_with_even_load(
    stack_settings: StackSettings,
):
    stack_settings.session_seconds = 30 * SCALE
    stack_settings.poll_interval = 5 * SCALE
    group = start_stack(stack_settings)
    try:
        result = run_load(
            LoadSettings(
                gateway_url=stack_settings.gateway_url,
                amqp_url=stack_settings.amqp_url,
                interval=2 * SCALE,
                duration=300 * SCALE,
                settle_timeout=60,
                ev_prefix="EV-E2E-",
            )
        )
    finally:
        exits = group.stop()
    report = result.report

    assert report.sent == 150
    assert report.accepted == report.sent, (report.rejected, report.errors)
    assert report.every_accepted_completed_once, report
    assert report.dead_lettered == 0 and report.unfinished == 0

    # The EV id reaches the substation unchanged (the original design charged "null").
    sent_ev_ids = {o.request_id: o.ev_id for o in result.outcomes if o.accepted}
    for request_id, fate in result.fates.items():
        assert [s.ev_id for s in fate.started] == [sent_ev_ids[request_id]]

    # Fair shares: 150 requests over three equal substations.
    assert sorted(report.requests_per_substation) == stack_settings.substation_ids()
    assert all(45 <= n <= 55 for n in report.requests_per_substation.values()), (
        report.requests_per_substation
    )

    balance = report.balance
    assert balance.samples > 250
    assert balance.spread_within_1 is not None and balance.spread_within_1 >= 0.90, balance
    assert balance.spread_max is not None and balance.spread_max <= 2, balance

    assert exits == {name: 0 for name in exits}, exits
