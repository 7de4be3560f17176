"""The history relay on the real broker: two gateway workers' brokers in this process share a
relay directory (a file lock excludes another open file description in the same process as
in another process), one reads the stream and relays it, the other is fed; and a worker cut
off from the relay (a gap, a broken socket, a relay that stops sending) reads the stream
itself again without losing a message. The workers as processes: test_history_relay_process.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from gateway import relay_protocol
from gateway.__main__ import prepared_relay_dir
from gateway.app import create_app
from gateway.broker import GatewayBroker
from gateway.config import GatewayConfig
from gateway.history import RequestHistory
from gateway.relay import FALLBACK_CAUSES, READING_MODES, HistoryRelay
from smartgrid import contract
from smartgrid.config import ConfigError, from_env
from tests.helpers import BrokerClient, Samples, eventually, sample_key, samples_of


def _broker(amqp_url: str, name: str, relay_dir: Path) -> GatewayBroker:
    broker = GatewayBroker(
        amqp_url,
        name=name,
        history=RequestHistory(),
        canary_interval=0,
        history_relay_dir=str(relay_dir),
    )
    assert broker.relay is not None
    broker.relay.retry_every = 0.1
    return broker


def _relay(broker: GatewayBroker) -> HistoryRelay:
    assert broker.relay is not None
    return broker.relay


@pytest.fixture
def pair(amqp_url: str, tmp_path: Path) -> Iterator[tuple[GatewayBroker, GatewayBroker]]:
    """A worker that reads the stream for the other, and the other, relayed to."""
    reader = _broker(amqp_url, "relay-reader", tmp_path)
    reader.start()
    assert reader.wait_ready(10) and reader.wait_caught_up(10)
    relay = reader.relay
    assert relay is not None
    eventually(lambda: relay.reading_for_others, timeout=5, what="the first worker reading")
    fed = _broker(amqp_url, "relay-fed", tmp_path)
    fed.start()
    try:
        assert fed.wait_ready(10) and fed.wait_caught_up(10)
        assert fed.relay is not None
        eventually(lambda: _relay(fed).relayed, timeout=5, what="the second worker relayed to")
        assert fed.reader.paused and not fed.relay.reading_for_others
        yield reader, fed
    finally:
        fed.stop()
        reader.stop()


def _app(amqp_url: str, broker: GatewayBroker) -> Flask:
    """A worker's HTTP API over ``broker``, with metrics of its own."""
    return create_app(GatewayConfig(amqp_url=amqp_url), broker=broker, registry=CollectorRegistry())


def _samples(app: Flask) -> Samples:
    return samples_of(app.test_client().get("/metrics").get_data(as_text=True))


def _shows_reading(app: Flask, mode: str) -> bool:
    """The worker's ``gateway_history_reading`` is 1 for ``mode`` and 0 for the others."""
    samples = _samples(app)
    shown = {
        each: samples.get(sample_key("gateway_history_reading", mode=each))
        for each in READING_MODES
    }
    return shown == {each: float(each == mode) for each in READING_MODES}


def _fallbacks(app: Flask) -> dict[str, float | None]:
    """The worker's ``gateway_history_relay_fallbacks_total`` by cause."""
    samples = _samples(app)
    return {
        cause: samples.get(sample_key("gateway_history_relay_fallbacks_total", cause=cause))
        for cause in FALLBACK_CAUSES
    }


def _routed(observer: BrokerClient, request_id: str, substation: str = "S1") -> None:
    observer.publish_event(contract.RequestRouted(time.time(), request_id, "EV", substation, "b1"))


def _status(broker: GatewayBroker, request_id: str) -> str | None:
    record = broker.history.get(request_id)
    return None if record is None else record["status"]


def _all_queued(broker: GatewayBroker, request_ids: list[str]) -> bool:
    return all(_status(broker, request_id) == "queued" for request_id in request_ids)


def test_a_worker_fed_by_the_relay_learns_what_the_reader_reads(
    amqp_url: str, pair: tuple[GatewayBroker, GatewayBroker]
):
    reader, fed = pair
    observer = BrokerClient(amqp_url)
    try:
        request_id = observer.send_request(ev_id="EV-RELAYED")
        _routed(observer, request_id)
        eventually(lambda: _status(fed, request_id) == "routed", what="the relayed routing")
        assert _status(reader, request_id) == "routed"
        assert fed.reader.paused  # it did not read the stream for it
        assert fed.reader.next_offset == reader.reader.next_offset
        assert fed.relay is not None and fed.relay.fallbacks == 0
    finally:
        observer.close()


def test_metrics_and_health_say_which_worker_reads_the_stream_for_the_others(
    amqp_url: str, pair: tuple[GatewayBroker, GatewayBroker]
):
    reader, fed = pair
    for broker, mode in ((reader, "relay"), (fed, "relayed")):
        app = _app(amqp_url, broker)
        eventually(partial(_shows_reading, app, mode), what=f"the worker shown as {mode}")
        assert _fallbacks(app) == dict.fromkeys(FALLBACK_CAUSES, 0.0)
        health = app.test_client().get("/health")
        assert health.status_code == 200
        assert health.get_json()["history_reading"] == mode


def test_a_gap_in_the_relayed_history_sends_the_worker_back_to_the_stream(
    amqp_url: str, pair: tuple[GatewayBroker, GatewayBroker]
):
    reader, fed = pair
    app = _app(amqp_url, fed)
    relay = reader.relay
    assert relay is not None and fed.relay is not None
    send_pending = relay._send_pending
    lost: list[bytes] = []

    def lose_one() -> None:  # the next message relayed never reaches the fed worker
        if not lost:
            lost.append(relay._pending.pop(0))
        send_pending()

    relay._send_pending = lose_one  # type: ignore[method-assign]
    observer = BrokerClient(amqp_url)
    try:
        first = observer.send_request(ev_id="EV-LOST")
        eventually(lambda: bool(lost), what="a relayed message lost")
        second = observer.send_request(ev_id="EV-AFTER-GAP")
        eventually(lambda: _relay(fed).fallbacks == 1, what="the gap noticed")
        eventually(lambda: _status(fed, first) == "queued", what="the lost one read anyway")
        eventually(lambda: _status(fed, second) == "queued", what="the next one")
        counted = {cause: float(cause == "gap") for cause in FALLBACK_CAUSES}
        eventually(lambda: _fallbacks(app) == counted, what="the fallback counted as a gap")
    finally:
        observer.close()


def test_a_broken_relay_socket_sends_the_worker_back_to_the_stream(
    amqp_url: str, pair: tuple[GatewayBroker, GatewayBroker]
):
    reader, fed = pair
    assert reader.relay is not None and fed.relay is not None
    relay = reader.relay
    app = _app(amqp_url, fed)
    fed.relay.retry_every = 60.0  # it does not ask to be relayed again during the test
    time.sleep(0.3)  # for the tick already due

    def drop_workers() -> None:
        for peer in list(relay._workers.values()):
            relay._drop_worker(peer)

    reader.link.call_soon(drop_workers)
    eventually(lambda: _relay(fed).fallbacks == 1, what="the broken socket noticed")
    observer = BrokerClient(amqp_url)
    try:
        request_id = observer.send_request(ev_id="EV-ALONE")
        _routed(observer, request_id)
        eventually(lambda: _status(fed, request_id) == "routed", what="the stream read again")
        assert not fed.reader.paused and not fed.relay.relayed
        counted = {cause: float(cause == "relay_connection") for cause in FALLBACK_CAUSES}
        assert _fallbacks(app) == counted
        eventually(
            lambda: _shows_reading(app, "stream"),
            timeout=10,
            what="the worker shown reading the stream itself",
        )
        assert app.test_client().get("/health").get_json()["history_reading"] == "stream"
    finally:
        observer.close()


def test_a_relay_that_stops_sending_is_noticed_by_the_stream_s_end(
    amqp_url: str, pair: tuple[GatewayBroker, GatewayBroker]
):
    """A reader that holds the socket open and sends nothing (stopped, or stuck): the fed
    worker's probes of the stream's end find it behind, and it reads the stream itself."""
    reader, fed = pair
    assert reader.relay is not None and fed.relay is not None
    # Probes every half second once the probe due now has been made (at most 5 s from now);
    # not in the other tests, where a loaded machine could make a relay half a second late.
    fed.reader.probe_every = 0.5
    app = _app(amqp_url, fed)
    reader.relay._send_pending = lambda: _relay(reader)._pending.clear()  # type: ignore[method-assign]
    observer = BrokerClient(amqp_url)
    try:
        request_id = observer.send_request(ev_id="EV-STUCK")
        _routed(observer, request_id)
        eventually(
            lambda: _status(fed, request_id) == "routed", timeout=20, what="the stream read again"
        )
        assert fed.relay.fallbacks >= 1
        assert fed.reader.resubscriptions >= 1
        behind = _fallbacks(app)["behind"]
        assert behind is not None and behind >= 1
    finally:
        observer.close()


def test_the_next_worker_reads_for_the_others_once_the_reader_stops(
    amqp_url: str, pair: tuple[GatewayBroker, GatewayBroker]
):
    reader, fed = pair
    assert fed.relay is not None
    reader.stop()  # lets go of the lock
    eventually(lambda: _relay(fed).reading_for_others, what="the fed worker reading for others")
    assert not fed.reader.paused
    observer = BrokerClient(amqp_url)
    try:
        request_id = observer.send_request(ev_id="EV-NEXT")
        _routed(observer, request_id)
        eventually(lambda: _status(fed, request_id) == "routed", what="the stream read")
    finally:
        observer.close()


def test_a_worker_of_another_stream_is_not_relayed_to(amqp_url: str, tmp_path: Path):
    """A relay directory shared by two gateways of different brokers or vhosts by mistake:
    the offsets of one stream mean nothing in the other."""
    reader = _broker(amqp_url, "relay-reader", tmp_path)
    other = _broker(amqp_url, "relay-other", tmp_path)
    assert other.relay is not None and reader.relay is not None
    other.relay.reads = b"another stream"
    reader.start()
    try:
        assert reader.wait_ready(10) and reader.wait_caught_up(10)
        eventually(lambda: _relay(reader).reading_for_others, timeout=5, what="the reader")
        other.start()
        assert other.wait_ready(10) and other.wait_caught_up(10)
        app = _app(amqp_url, reader)
        time.sleep(1.0)  # ten tries to be relayed to
        assert not other.relay.relayed and not other.reader.paused
        refused = _fallbacks(app)["other_stream"]
        assert refused is not None and refused >= 1
    finally:
        other.stop()
        reader.stop()


def test_the_relay_s_window_is_a_positive_number_of_messages():
    assert GatewayConfig().history_relay_window == relay_protocol.WINDOW == 20_000
    assert from_env(GatewayConfig, {"HISTORY_RELAY_WINDOW": "500"}).history_relay_window == 500
    for wrong in ("0", "-3", "1.5", "many"):
        with pytest.raises(ConfigError, match="HISTORY_RELAY_WINDOW"):
            from_env(GatewayConfig, {"HISTORY_RELAY_WINDOW": wrong})


@pytest.mark.parametrize(
    ("window", "relayed"),
    [(2, False), (relay_protocol.WINDOW, True)],
    ids=["beyond-the-window", "within-the-window"],
)
def test_a_worker_further_behind_than_the_relay_s_window_reads_the_stream_itself(
    amqp_url: str, tmp_path: Path, window: int, relayed: bool
):
    """HISTORY_RELAY_WINDOW: a worker that asks to follow on from further back than the
    reader's last ``window`` messages is refused, and reads what it missed from the stream
    itself; from within the window, the reader relays it what it missed."""
    config = GatewayConfig(
        amqp_url=amqp_url, history_relay_dir=str(tmp_path), history_relay_window=window
    )
    app = create_app(config, registry=CollectorRegistry())  # the reader, as a worker makes it
    reader: GatewayBroker = app.extensions["smartgrid.broker"]
    behind = _broker(amqp_url, "relay-behind", tmp_path)
    relay = _relay(behind)
    relay.retry_every = 60.0  # it asks to be relayed to when the test says so, once
    behind.reader.probe_every = 60.0  # nor does it notice by itself that it is behind
    observer = BrokerClient(amqp_url)
    try:
        assert reader.wait_ready(10) and reader.wait_caught_up(10)
        eventually(lambda: _relay(reader).reading_for_others, timeout=5, what="the reader")
        behind.start()
        assert behind.wait_ready(10) and behind.wait_caught_up(10)
        behind.link.call_soon(behind.reader.pause)  # it stops reading: it falls behind
        eventually(lambda: behind.reader.paused, what="the worker no longer reading")
        missed = [observer.send_request(ev_id=f"EV-MISSED-{n}") for n in range(3)]
        eventually(lambda: _all_queued(reader, missed), what="the reader reading them")
        assert [_status(behind, request_id) for request_id in missed] == [None] * 3
        behind.link.call_soon(relay._tick)  # it asks to follow on from its own offset
        eventually(lambda: _all_queued(behind, missed), what="the worker learning them")
        assert relay.relayed == relayed
        assert behind.reader.paused == relayed  # relayed to, or reading the stream itself
        assert relay.fallbacks == 0  # refused before it was ever fed
    finally:
        observer.close()
        behind.stop()
        reader.stop()


def test_one_worker_reads_the_history_itself_without_a_relay_directory(
    amqp_url: str, tmp_path: Path
):
    relay_dir = tmp_path / "relay"
    config = GatewayConfig(amqp_url=amqp_url, workers=1, history_relay_dir=str(relay_dir))
    with prepared_relay_dir(config) as served:
        assert served.history_relay_dir == ""
    assert not relay_dir.exists()
    # A worker built directly (not by python -m gateway's master) is not relayed to either.
    app = create_app(config, registry=CollectorRegistry())
    broker: GatewayBroker = app.extensions["smartgrid.broker"]
    try:
        assert broker.relay is None and not broker.reader.pausable
    finally:
        broker.stop()


def test_several_workers_relay_through_the_configured_directory_or_a_temporary_one(
    tmp_path: Path,
):
    relay_dir = tmp_path / "relay"
    with prepared_relay_dir(GatewayConfig(workers=2, history_relay_dir=str(relay_dir))) as served:
        assert served.history_relay_dir == str(relay_dir) and relay_dir.is_dir()
    assert relay_dir.is_dir()  # the configured one is kept
    with prepared_relay_dir(GatewayConfig(workers=2)) as served:
        temporary = Path(served.history_relay_dir)
        assert temporary.is_dir()
    assert not temporary.exists()
