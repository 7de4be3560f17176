"""Parsing real /metrics pages, as the substation's collector renders them, into readings."""

from __future__ import annotations

import math

import pika
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from balancer.readings import InvalidReading, parse_reading
from smartgrid import contract
from smartgrid.amqp import Delivery
from substation.charging import ChargingPoints, ChargingPointsCollector


def points(
    substation: str = "s1",
    capacity: float = 4,
    instance: str = "inst-1",
    *,
    received: int = 0,
    completed: int = 0,
) -> ChargingPoints[Delivery]:
    # capacity: a float on purpose, for the test of a capacity that is not an integer.
    charging: ChargingPoints[Delivery] = ChargingPoints(
        substation,
        capacity,  # type: ignore[arg-type]
        instance,
    )
    charging.received = received
    charging.completed = completed
    return charging


def page(*charging: ChargingPoints) -> str:
    registry = CollectorRegistry()
    for each in charging:
        registry.register(ChargingPointsCollector(each))
    return generate_latest(registry).decode()


def drop_samples(text: str, metric: str) -> str:
    return "\n".join(line for line in text.splitlines() if metric not in line) + "\n"


def test_a_real_metrics_page_is_read_into_a_reading():
    charging = points("s1", 6, "inst-42", received=17, completed=12)
    text = page(charging)
    assert (
        "# TYPE substation_requests_received_total counter" in text
        or "# TYPE substation_requests_received counter" in text
    )
    assert 'substation_requests_received_total{substation="s1"} 17.0' in text
    reading = parse_reading(text, "s1")
    assert reading == contract.SubstationReading(
        substation="s1", instance="inst-42", load=0.0, capacity=6, received=17.0, completed=12.0
    )
    assert type(reading.capacity) is int


def test_the_counters_and_load_follow_admitted_and_finished_sessions():
    charging = points("s1", 4)
    for n in range(3):
        routed = contract.RoutedRequest(f"{n:032x}", "EV1", 1.0, "s1", 2.0, "b")
        delivery = Delivery(
            1, n + 1, contract.DISPATCH_EXCHANGE, "s1", False, pika.BasicProperties(), b""
        )
        charging.admit(routed, delivery, now=10.0, duration=30.0)
    charging.finish(f"{0:032x}", now=20.0)
    reading = parse_reading(page(charging), "s1")
    assert (reading.load, reading.received, reading.completed) == (2, 3, 1)


def test_a_page_with_several_substations_is_read_for_the_one_asked_for():
    text = page(
        points("s1", 4, "i-one", received=1),
        points("s2", 8, "i-two", received=2),
        points("s3", 2, "i-3"),
    )
    reading = parse_reading(text, "s2")
    assert (reading.substation, reading.instance, reading.capacity, reading.received) == (
        "s2",
        "i-two",
        8,
        2.0,
    )
    assert parse_reading(text, "s1").instance == "i-one"


def test_a_page_with_the_substations_in_separate_expositions_is_read_for_the_one_asked_for():
    text = page(points("s1", 4, "i-one")) + page(points("s2", 8, "i-two"))
    assert parse_reading(text, "s2").capacity == 8
    assert parse_reading(text, "s1").capacity == 4


@pytest.mark.parametrize(
    ("metric", "missing"),
    [
        (contract.LOAD_METRIC, "load"),
        (contract.CAPACITY_METRIC + "{", "capacity"),
        (contract.RECEIVED_METRIC, "received"),
        (contract.COMPLETED_METRIC, "completed"),
    ],
)
def test_a_page_missing_a_metric_is_rejected_naming_it(metric: str, missing: str):
    text = drop_samples(page(points()), metric)
    with pytest.raises(InvalidReading, match=missing):
        parse_reading(text, "s1")


def test_a_page_without_the_info_metric_is_rejected_for_lack_of_an_instance():
    text = drop_samples(page(points()), contract.INFO_METRIC)
    with pytest.raises(InvalidReading, match="instance"):
        parse_reading(text, "s1")


def test_a_page_labelled_for_another_substation_is_rejected():
    text = page(points("s2", 4))
    with pytest.raises(InvalidReading, match="'s1'"):
        parse_reading(text, "s1")


def test_a_substation_id_that_is_a_prefix_of_another_is_not_confused_with_it():
    text = page(points("s10", 4))
    with pytest.raises(InvalidReading):
        parse_reading(text, "s1")


def test_a_nan_value_is_rejected():
    charging = points()
    charging.received = math.nan  # type: ignore[assignment]  # a counter that is not an int, on purpose
    text = page(charging)
    assert "NaN" in text
    with pytest.raises(InvalidReading, match="received is nan"):
        parse_reading(text, "s1")


def test_an_infinite_value_is_rejected():
    charging = points()
    charging.completed = math.inf  # type: ignore[assignment]  # a counter that is not an int, on purpose
    with pytest.raises(InvalidReading, match="completed is inf"):
        parse_reading(page(charging), "s1")


def test_a_negative_value_is_rejected():
    charging = points()
    charging.received = -1
    with pytest.raises(InvalidReading, match="received is -1"):
        parse_reading(page(charging), "s1")


@pytest.mark.parametrize("capacity", [0, 2.5])
def test_a_capacity_that_is_not_a_positive_integer_is_rejected(capacity: float):
    with pytest.raises(InvalidReading, match="capacity is"):
        parse_reading(page(points(capacity=capacity)), "s1")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "this is not a metrics page {{{",
        "<html><body>502 Bad Gateway</body></html>",
        'substation_current_load{substation="s1" 3\n',
        'substation_current_load{substation="s1"} three\n',
    ],
)
def test_garbage_is_rejected_as_an_invalid_reading(text: str):
    with pytest.raises(InvalidReading):
        parse_reading(text, "s1")


def test_a_truncated_page_is_rejected():
    text = page(points())
    cut = text[: text.index(contract.COMPLETED_METRIC)]
    with pytest.raises(InvalidReading, match="completed"):
        parse_reading(cut, "s1")


def test_an_info_metric_that_is_not_one_gives_no_instance():
    text = page(points(instance="inst-1")).replace(
        'instance_id="inst-1",substation="s1"} 1.0', 'instance_id="inst-1",substation="s1"} 0.0'
    )
    with pytest.raises(InvalidReading, match="instance"):
        parse_reading(text, "s1")


def test_a_substation_of_an_earlier_build_is_read_by_its_instance_label():
    # The info metric's label was "instance" before it became "instance_id": a balancer
    # upgraded first keeps reading substations that have not been restarted yet.
    text = page(points(instance="inst-1")).replace('instance_id="inst-1"', 'instance="inst-1"')
    assert 'instance="inst-1"' in text
    assert parse_reading(text, "s1").instance == "inst-1"


def test_the_other_families_of_a_page_are_not_read():
    # Only the reading's own families are parsed (issue 16): a page's other families, even one
    # the parser would refuse, leave the reading as it is.
    text = page(points("s1", 6, "inst-42", received=17, completed=12))
    other = '# TYPE substation_wait_seconds histogram\nsubstation_wait_seconds_bucket{le="1" 3\n'
    assert parse_reading(other + text, "s1") == parse_reading(text, "s1")
    with pytest.raises(InvalidReading):
        parse_reading(text.replace("} 17.0", " 17.0"), "s1")
