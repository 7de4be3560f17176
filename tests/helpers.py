"""Small helpers for tests that drive real processes and a real broker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import TypeVar

import pika
import pika.exceptions
from prometheus_client.parser import text_string_to_metric_families

from smartgrid import contract
from smartgrid.amqp import link
from stack.processes import ServiceProcess

T = TypeVar("T")
E = TypeVar("E", bound=contract.Event)

ENV_EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


def env_example() -> dict[str, str]:
    """The variables of .env.example, as compose would read them from a copied .env."""
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    """Every sample of a metrics page's text, keyed by :func:`sample_key`."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample_key(sample.name, **sample.labels)] = sample.value
    return samples


def sample_key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(name, sorted labels): how :func:`samples_of` keys a sample."""
    return name, tuple(sorted(labels.items()))


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return samples_of(response.read().decode())


def metric(url: str, name: str, **labels: str) -> float | None:
    return scrape(url).get(sample_key(name, **labels))


def health_url(service: ServiceProcess) -> str:
    """The URL ``service`` answers on when healthy (a substation's or a balancer's /metrics
    page, the gateway's /health): stack.local gives every service one."""
    assert service.health_url is not None, f"{service.name} has no health URL"
    return service.health_url


def kill(service: ServiceProcess, timeout: float = 10) -> None:
    """SIGKILL ``service`` and reap it: it is gone when this returns."""
    assert service.process is not None, f"{service.name} was never started"
    service.signal(signal.SIGKILL)
    service.process.wait(timeout)


def http_json(
    url: str, method: str = "GET", body: dict | None = None, *, timeout: float = 30
) -> tuple[int, Message, dict]:
    """A JSON call to a real HTTP server: its status, headers and JSON body, errors included."""
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def present(value: T | None) -> T:
    """``value``, failing the test if it is None (a test that expects an answer, narrowed)."""
    if value is None:
        raise AssertionError("expected a value, got None")
    return value


def eventually(
    check: Callable[[], T | None], *, timeout: float = 20.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy, and return that (never None); fail
    with ``what`` after ``timeout``.

    A connection error counts as "not yet" (a service that is restarting refuses connections).
    """
    deadline = time.monotonic() + timeout
    last: T | OSError | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        time.sleep(interval)
    raise AssertionError(f"not true after {timeout}s: {what or check} (last value {last!r})")


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120)


def import_document(document: dict) -> None:
    """``rabbitmqctl import_definitions`` of ``document`` (it finishes asynchronously)."""
    # rabbitmqctl runs as the rabbitmq user, who cannot read pytest's private tmp_path (and
    # 3.10 does not read "-" as standard input): a readable file directly in /tmp.
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir="/tmp") as handle:
        json.dump(document, handle)
        handle.flush()
        os.chmod(handle.name, 0o644)
        result = rabbitmqctl("import_definitions", handle.name)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def imported_definitions(document: dict, passwords: dict[str, str]) -> Iterator[dict[str, str]]:
    """Import broker definitions into the local RabbitMQ and yield each user's AMQP URL.

    Users are renamed with a random suffix, so they cannot collide with anything else on the
    broker (users are not per vhost); the vhost and the users are deleted afterwards.
    """
    vhost = document["vhosts"][0]["name"]
    suffix = "-" + uuid.uuid4().hex[:6]
    document = json.loads(json.dumps(document))
    for entry in document.get("users", []):
        entry["name"] += suffix
    for key in ("permissions", "topic_permissions"):
        for entry in document.get(key, []):
            entry["user"] += suffix
    import_document(document)
    try:
        # The import finishes asynchronously.
        eventually(
            lambda: vhost in rabbitmqctl("list_vhosts").stdout.split(),
            timeout=30,
            what="vhost imported",
        )
        yield {
            user: f"amqp://{user}{suffix}:{password}@localhost:5672/{vhost}"
            for user, password in passwords.items()
        }
    finally:
        rabbitmqctl("delete_vhost", vhost)
        for entry in document.get("users", []):
            rabbitmqctl("delete_user", entry["name"])


def event_senders(urls: dict[str, str]) -> str:
    """EVENT_SENDERS for services whose users are those of ``urls`` (role -> AMQP URL), as
    :func:`imported_definitions` renamed them."""
    return ",".join(
        f"{role}={pika.URLParameters(url).credentials.username}" for role, url in urls.items()
    )


def _all_of(events: list[contract.Event], cls: type[E]) -> list[E]:
    found = [event for event in events if isinstance(event, cls)]
    assert len(found) == len(events), f"not all {cls.kind}: {events}"
    return found


class BrokerClient:
    """A blocking pika client for tests: publish with confirms, count and read queues."""

    def __init__(self, url: str):
        parameters = pika.URLParameters(url)
        #: Every publish carries it as user_id, as the services' do.
        self.user = parameters.credentials.username
        self._accepted: dict[str, float] = {}
        self.connection = pika.BlockingConnection(parameters)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.declare(contract.core_topology())

    def close(self) -> None:
        try:
            if self.connection.is_open:
                self.connection.close()
        except pika.exceptions.AMQPError:
            pass  # already closed by the broker

    def publish(self, exchange: str, routing_key: str, body: bytes) -> None:
        self.channel.basic_publish(
            exchange,
            routing_key,
            body,
            pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent,
                content_type="application/json",
                user_id=self.user,
            ),
            mandatory=True,
        )

    def declare(self, declarations: list[contract.Declaration]) -> None:
        """Declare part of the contract's topology, as the services would before they start."""
        for declaration in declarations:
            link.declare(self.channel, declaration)

    def publish_event(self, event: contract.Event) -> None:
        """Publish a lifecycle event as a service would (consumers check its user_id)."""
        self.channel.basic_publish(
            contract.EVENTS_EXCHANGE,
            event.kind,
            event.to_body(),
            pika.BasicProperties(content_type="application/json", user_id=self.user),
        )

    def send_to_substation(
        self,
        substation: str,
        *,
        request_id: str | None = None,
        ev_id: str = "EV1",
        maybe_duplicate: bool = False,
    ) -> str:
        request_id = request_id or uuid.uuid4().hex
        now = time.time()
        # A copy of a request sent before keeps its acceptance (the same attempt).
        accepted_at = self._accepted.setdefault(request_id, now)
        routed = contract.RoutedRequest(
            request_id, ev_id, accepted_at, substation, now, "test", maybe_duplicate=maybe_duplicate
        )
        self.publish(contract.DISPATCH_EXCHANGE, substation, routed.to_body())
        return request_id

    def send_request(self, *, ev_id: str = "EV1") -> str:
        request = contract.ChargeRequest(uuid.uuid4().hex, ev_id, time.time())
        self.publish(contract.REQUESTS_EXCHANGE, contract.REQUEST_ROUTING_KEY, request.to_body())
        return request.request_id

    def message_count(self, queue: str) -> int:
        """Ready (not delivered, or returned) messages in ``queue``."""
        return self.channel.queue_declare(queue, passive=True).method.message_count

    def get_all(self, queue: str) -> list[tuple[pika.spec.BasicProperties, bytes]]:
        """Take every message waiting in ``queue``. By a consumer, not ``basic.get``, which
        quorum queues with a single active consumer (the pending queue) refuse."""
        messages = []
        for method, properties, body in self.channel.consume(queue, inactivity_timeout=0.3):
            if method is None:
                break
            self.channel.basic_ack(method.delivery_tag)
            messages.append((properties, body))
        self.channel.cancel()
        return messages

    def get_one(self, queue: str) -> pika.spec.Basic.Deliver | None:
        """One message of ``queue``, delivered and not settled (as :meth:`get_all`), or None."""
        self.channel.basic_qos(prefetch_count=1)
        try:
            method, _properties, _body = next(self.channel.consume(queue, inactivity_timeout=0.3))
        finally:
            self.channel.cancel()
            self.channel.basic_qos(prefetch_count=0)
        return method

    def subscribe_events(self, *kinds: str) -> str:
        queue = self.channel.queue_declare("", exclusive=True).method.queue
        for kind in kinds or ("#",):
            self.channel.queue_bind(queue, contract.EVENTS_EXCHANGE, kind)
        return queue

    def events_of(self, queue: str, cls: type[E]) -> list[E]:
        """:meth:`events`, which must all be of ``cls`` (``queue`` is bound to its kind)."""
        return _all_of(self.events(queue), cls)

    def events_of_until(
        self, queue: str, cls: type[E], count: int, timeout: float = 20.0
    ) -> list[E]:
        """:meth:`events_until` ``count`` have come, which must all be of ``cls``."""
        return _all_of(self.events_until(queue, lambda seen: len(seen) >= count, timeout), cls)

    def events_until(
        self, queue: str, enough: Callable[[list[contract.Event]], bool], timeout: float = 20.0
    ) -> list[contract.Event]:
        """What ``queue`` received, read until ``enough`` of it has come. A service publishes
        an event on a loop turn after the change that its metrics show at once."""
        seen: list[contract.Event] = []

        def check() -> bool:
            seen.extend(self.events(queue))
            return enough(seen)

        eventually(check, timeout=timeout, what=f"enough events on {queue}")
        return seen

    def events(self, queue: str) -> list[contract.Event]:
        self.connection.process_data_events(0)
        found: list[contract.Event] = []
        while True:
            method, _properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.extend(contract.decode_events(method.routing_key, body))
