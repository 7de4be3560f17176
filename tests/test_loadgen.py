"""loadgen on its own: arrival schedules, report maths, the CLI, and sending to a real (tiny)
HTTP server started here that answers 202, 422 or 503, closes the connection, or sleeps past
the timeout, so each kind of failure is seen to be counted apart. No broker, no timing asserts.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from loadgen import __main__ as cli
from loadgen.live import LiveView
from loadgen.observer import RequestFate
from loadgen.plot import write_plot
from loadgen.report import (
    LoadTimeline,
    Report,
    balance_of,
    build_report,
    capacities_for,
    jain_index,
    percentile,
    render,
    timeline_of,
)
from loadgen.run import LoadSettings, arrivals_for, run_load
from loadgen.schedules import (
    RateProfile,
    burst_arrivals,
    constant_arrivals,
    named_profile,
    poisson_arrivals,
    profile_arrivals,
    rush_hour,
    spike,
)
from loadgen.summary import summary
from loadgen.traffic import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    Outcome,
    SendStats,
    drive,
    token_from_env,
)
from smartgrid import contract
from smartgrid.config import ConfigError
from tests.helpers import present


def take_until(offsets: Iterator[float], end: float) -> list[float]:
    return list(itertools.takewhile(lambda t: t < end, offsets))


def counts_per_bin(offsets: list[float], width: float, end: float) -> list[int]:
    bins = [0] * round(end / width)
    for t in offsets:
        bins[min(int(t // width), len(bins) - 1)] += 1
    return bins


# ------------------------------------------------------------------------------ schedules
def test_constant_arrivals_are_evenly_spaced_from_zero():
    offsets = take_until(constant_arrivals(2.0), 300.0)
    assert len(offsets) == 150
    assert offsets[:3] == [0.0, 2.0, 4.0] and offsets[-1] == 298.0


def test_poisson_arrivals_have_the_rate_and_repeat_with_the_seed():
    first = take_until(poisson_arrivals(5.0, random.Random(7)), 1000.0)
    again = take_until(poisson_arrivals(5.0, random.Random(7)), 1000.0)
    other = take_until(poisson_arrivals(5.0, random.Random(8)), 1000.0)
    assert first == again
    assert first != other
    assert 4500 < len(first) < 5500  # 5000 expected; seeded, so always the same number
    assert all(b >= a for a, b in itertools.pairwise(first))


def test_bursts_send_n_at_once_every_t_seconds():
    offsets = list(itertools.islice(burst_arrivals(4, 2.5), 12))
    assert offsets == [0.0] * 4 + [2.5] * 4 + [5.0] * 4
    assert len(take_until(burst_arrivals(10, 5.0), 60.0)) == 120
    with pytest.raises(ValueError):
        next(burst_arrivals(0, 1.0))


def test_rush_hour_ramps_up_holds_and_ramps_down():
    profile = rush_hour(peak=2.0, duration=400.0)
    offsets = list(profile_arrivals(profile))
    # off-peak 0.4/s ramping to 2/s over 100 s, 2/s for 200 s, back down over 100 s
    assert profile.expected() == pytest.approx(2 * (1.2 * 100) + 2.0 * 200)
    assert len(offsets) == round(profile.expected())
    bins = counts_per_bin(offsets, 50.0, 400.0)
    assert bins[0] < bins[1] < bins[2] == bins[3] == bins[4] == bins[5] > bins[6] > bins[7]
    assert bins[2] == 100  # the peak: 2/s for 50 s
    assert bins[:2] == bins[:-3:-1]  # symmetric
    assert profile.rate_at(0) == pytest.approx(0.4) and profile.rate_at(200) == 2.0


def test_spike_is_a_short_burst_of_factor_times_the_base_rate():
    profile = spike(base=1.0, duration=200.0, factor=10.0)
    offsets = list(profile_arrivals(profile))
    in_spike = [t for t in offsets if 100.0 <= t < 110.0]
    before = [t for t in offsets if 90.0 <= t < 100.0]
    assert len(in_spike) == 100 and len(before) == 10
    assert len(offsets) == 190 + 100
    assert (
        profile.rate_at(99.9) == 1.0
        and profile.rate_at(100.0) == 10.0
        and profile.rate_at(110.0) == 1.0
    )


def test_the_seed_profile_is_the_seed_scenario():
    assert list(profile_arrivals(named_profile("seed"))) == take_until(
        constant_arrivals(2.0), 300.0
    )
    assert named_profile("rush-hour", rate=3.0).points[2] == (225.0, 3.0)
    with pytest.raises(ValueError):
        named_profile("lunch")


def test_poisson_profiles_follow_the_rate_and_repeat_with_the_seed():
    profile = rush_hour(peak=5.0, duration=400.0)
    first = list(profile_arrivals(profile, poisson=True, rng=random.Random(3)))
    assert first == list(profile_arrivals(profile, poisson=True, rng=random.Random(3)))
    assert first != list(profile_arrivals(profile, poisson=True, rng=random.Random(4)))
    bins = counts_per_bin(first, 100.0, 400.0)
    assert bins[1] > 1.5 * bins[0] and bins[2] > 1.5 * bins[3]
    assert abs(len(first) - profile.expected()) < 0.1 * profile.expected()


def test_time_scale_compresses_every_schedule():
    profile = rush_hour(peak=1.0, duration=300.0)
    fast = profile.scaled(0.1)
    assert fast.duration == pytest.approx(30.0) and fast.rate_at(15.0) == pytest.approx(10.0)
    assert fast.expected() == pytest.approx(profile.expected())
    assert list(profile_arrivals(fast)) == pytest.approx(
        [t * 0.1 for t in profile_arrivals(profile)]
    )
    slow = list(profile_arrivals(profile, poisson=True, rng=random.Random(1)))
    quick = list(profile_arrivals(fast, poisson=True, rng=random.Random(1)))
    assert quick == pytest.approx([t * 0.1 for t in slow])
    # and through the CLI: intervals, bursts, durations, profiles
    seed = cli.settings_from_args(
        cli.build_parser().parse_args(["--scenario", "seed", "--time-scale", "0.1"])
    )
    assert (seed.interval, seed.duration) == (pytest.approx(0.2), pytest.approx(30.0))
    bursts = cli.settings_from_args(
        cli.build_parser().parse_args(["--burst", "5", "--burst-every", "4", "--time-scale", "0.5"])
    )
    assert (bursts.burst, bursts.burst_every, bursts.duration) == (5, 2.0, 30.0)
    rush = cli.settings_from_args(
        cli.build_parser().parse_args(
            ["--profile", "rush-hour", "--rate", "2", "--time-scale", "0.1"]
        )
    )
    assert rush.duration == pytest.approx(30.0)
    assert present(rush.profile).rate_at(15.0) == pytest.approx(20.0)


def test_rate_profiles_refuse_nonsense():
    for points in (
        ((0.0, 1.0),),
        ((1.0, 1.0), (2.0, 1.0)),
        ((0.0, 1.0), (2.0, 1.0), (1.0, 1.0)),
        ((0.0, -1.0), (1.0, 1.0)),
    ):
        with pytest.raises(ValueError):
            RateProfile(points)


def test_settings_choose_the_arrival_generator():
    def first(settings: LoadSettings, n: int = 6) -> list[float]:
        return list(itertools.islice(arrivals_for(settings), n))

    assert first(LoadSettings(interval=0.5)) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert first(LoadSettings(burst=3, burst_every=2.0)) == [0.0, 0.0, 0.0, 2.0, 2.0, 2.0]
    assert first(LoadSettings(arrivals="poisson", interval=0.5, seed=5)) == first(
        LoadSettings(arrivals="poisson", interval=0.5, seed=5)
    )
    assert first(LoadSettings(arrivals="poisson", interval=0.5, seed=5)) != first(
        LoadSettings(arrivals="poisson", interval=0.5, seed=6)
    )
    assert first(LoadSettings(profile=spike(1.0, 100.0)), 3) == [0.0, 1.0, 2.0]


def test_profile_and_scenario_flags():
    parse = cli.build_parser().parse_args
    assert (
        cli.settings_from_args(parse(["--profile", "seed"])).interval
        == cli.settings_from_args(parse(["--scenario", "seed"])).interval
        == 2.0
    )
    spiky = cli.settings_from_args(
        parse(["--profile", "spike", "--spike-factor", "4", "--duration", "100"])
    )
    assert present(spiky.profile).rate_at(50.0) == pytest.approx(2.0) and spiky.duration == 100.0
    assert "spike" in spiky.scenario
    assert cli.settings_from_args(parse([])).duration == 60.0
    assert cli.settings_from_args(parse(["--count", "5"])).duration is None


# ------------------------------------------------------------------------------ report maths
def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(10, 0, -1)]
    assert [percentile(values, q) for q in (0, 50, 90, 95, 99, 100)] == [
        1.0,
        5.0,
        9.0,
        10.0,
        10.0,
        10.0,
    ]
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0


def test_jain_index():
    assert jain_index([4, 4, 4]) == 1.0
    assert jain_index([9, 0, 0]) == pytest.approx(1 / 3)
    assert jain_index([1, 3]) == pytest.approx(16 / 20)
    assert jain_index([0, 0]) is None


def _fate(substation: str, start: float, end: float | None, request_id: str) -> RequestFate:
    fate = RequestFate(routed_to=[substation])
    fate.started.append(
        contract.SessionStarted(start, request_id, "EV1", substation, "i", start - 0.5, start + 10)
    )
    if end is not None:
        fate.completed.append(
            contract.SessionCompleted(end, request_id, "EV1", substation, "i", start)
        )
    return fate


def test_spread_on_a_hand_made_timeline():
    # a: sessions over [0, 4) and [1, 3); b: one over [2, 4). Sampled each second at 0..4:
    #   t=0: a1 b0 | t=1: a2 b0 | t=2: a2 b1 | t=3: a1 b1 | t=4: a0 b0
    fates = {
        "r1": _fate("a", 0.0, 4.0, "r1"),
        "r2": _fate("a", 1.0, 3.0, "r2"),
        "r3": _fate("b", 2.0, 4.0, "r3"),
    }
    timeline = LoadTimeline.from_fates(fates, {"a", "b"})
    assert timeline.span == (0.0, 4.0)
    assert [loads for _, loads in timeline.samples(1.0)] == [[1, 0], [2, 0], [2, 1], [1, 1], [0, 0]]
    assert [s for _, s in timeline.spread_series(1.0)] == [1, 2, 1, 0, 0]
    balance = balance_of(timeline, 1.0)
    assert balance.samples == 5
    assert balance.spread_within_1 == pytest.approx(4 / 5)
    assert balance.spread_mean == pytest.approx(4 / 5)
    assert balance.spread_max == 2 and balance.peak_load == 2
    # busy samples: [1,0] [2,0] [2,1] [1,1]
    assert balance.jain_mean == pytest.approx((0.5 + 0.5 + 0.9 + 1.0) / 4)
    assert balance.peak_to_average == pytest.approx((2 + 2 + 4 / 3 + 1) / 4)
    # over the run a averaged 6/5 sessions and b 2/5: Jain (1.6^2) / (2 * (1.44 + 0.16))
    assert balance.jain_over_run == pytest.approx(2.56 / 3.2)
    assert balance.utilisation_spread_mean is None  # no capacity known: assumed equal


def test_utilisation_normalised_spread_when_capacities_differ():
    # b has twice a's points and always twice a's sessions: raw spread, yet even utilisation
    fates = {}
    for i in range(5):
        fates[f"a{i}"] = _fate("a", 0.0, 10.0, f"a{i}")
    for i in range(10):
        fates[f"b{i}"] = _fate("b", 0.0, 10.0, f"b{i}")
    timeline = LoadTimeline.from_fates(fates, {"a", "b"})
    balance = balance_of(timeline, 1.0, {"a": 10, "b": 20})
    assert balance.spread_max == 5 and balance.spread_within_1 == pytest.approx(1 / 11)
    assert balance.capacities_differ
    assert balance.utilisation_spread_mean == 0 and balance.utilisation_spread_max == 0
    assert balance.jain_over_run == pytest.approx(1.0)  # each carried its share of the work
    assert balance.mean_utilisation["a"] == pytest.approx(0.5 * 10 / 11)
    # equal capacities: the utilisation spread is the raw spread over the capacity
    equal = balance_of(timeline, 1.0, {"a": 10, "b": 10})
    assert not equal.capacities_differ
    assert equal.utilisation_spread_max == pytest.approx(0.5)
    # one unknown is assumed like the others
    assert capacities_for(["a", "b", "c"], {"a": 10, "b": 20}) == [10, 20, 15]
    assert capacities_for(["a"], {}) is None


def _outcome(status: int | None = None, error: str | None = None, latency: float = 0.01) -> Outcome:
    accepted = status == 202
    return Outcome(
        "EV1",
        0.0,
        latency,
        status=status,
        error=error,
        request_id=uuid.uuid4().hex if accepted else None,
        routed_to="a" if accepted else None,
    )


def test_report_counts_rejections_and_errors_apart_and_the_rates():
    outcomes = (
        [_outcome(202, latency=i / 1000) for i in range(1, 11)]
        + [_outcome(422), _outcome(413), _outcome(503), _outcome(503)]
        + [
            _outcome(error="refused"),
            _outcome(error="timeout"),
            _outcome(error="disconnected"),
            _outcome(error="refused"),
        ]
    )
    report = build_report(outcomes, None, send_seconds=9.0)
    assert (report.sent, report.accepted) == (18, 10)
    assert report.rejected == {"422": 1, "413": 1, "503": 2}
    assert report.rejected_by_class == {"4xx": 2, "5xx": 2}
    assert report.errors == {"refused": 2, "timeout": 1, "disconnected": 1}
    assert report.send_rate == pytest.approx(2.0) and report.accepted_per_s == pytest.approx(10 / 9)
    assert report.accept_latency_ms == {
        "p50": pytest.approx(5.0),
        "p95": pytest.approx(10.0),
        "p99": pytest.approx(10.0),
        "max": pytest.approx(10.0),
    }
    text = render(report)
    assert "rejected 4 (4xx: 2 [413: 1, 422: 1]; 5xx: 2 [503: 2])" in text
    assert (
        "errors 4 (connection closed without an answer: 1, connection refused: 2, timeout: 1)"
        in text
    )
    assert "send rate 2.00/s over 9.0 s; accepted 1.11/s" in text
    screen = io.StringIO()
    console = Console(file=screen, width=140, color_system=None)
    console.print(summary(report))
    table = screen.getvalue()
    for row in (
        "rejected 4xx",
        "rejected 5xx",
        "error: connection refused",
        "error: timeout",
        "error: connection closed without an answer",
    ):
        assert row in table


def test_a_substation_that_received_nothing_counts_in_the_spread():
    """All traffic on one of three substations (issue 12): the two idle ones, known from their
    announcements (the capacities), are in the spread at 0, not left out of it."""
    outcomes = [_outcome(202) for _ in range(4)]
    fates: dict[str, RequestFate] = {}
    for i, o in enumerate(outcomes):
        o.routed_to = "busy"
        assert o.request_id is not None  # accepted
        fates[o.request_id] = _fate("busy", float(i), float(i) + 10, o.request_id)
    capacities = {"busy": 10, "idle-1": 10, "idle-2": 10}
    report = build_report(outcomes, fates, sample_interval=0.5, capacities=capacities)
    assert report.requests_per_substation == {"busy": 4, "idle-1": 0, "idle-2": 0}
    assert report.balance.spread_within_1 is not None and report.balance.spread_within_1 < 0.9
    assert report.balance.spread_max == 4
    alone = build_report(outcomes, fates, sample_interval=0.5)  # what it used to see
    assert alone.balance.spread_within_1 == 1.0


def test_report_with_fates_and_capacities_renders_everywhere(tmp_path: Path):
    outcomes = [_outcome(202) for _ in range(6)]
    fates: dict[str, RequestFate] = {}
    for i, o in enumerate(outcomes):
        substation = "a" if i < 2 else "b"
        o.routed_to = substation
        assert o.request_id is not None  # accepted
        fates[o.request_id] = _fate(substation, float(i), float(i) + 5, o.request_id)
    report = build_report(
        outcomes, fates, sample_interval=0.5, capacities={"a": 2, "b": 4}, send_seconds=6.0
    )
    report.scenario = "hand-made"
    assert report.requests_per_substation == {"a": 2, "b": 4}
    assert report.completed_once == 6 and report.every_accepted_completed_once
    assert report.balance.capacities_differ and report.capacities == {"a": 2, "b": 4}
    assert "capacities differ (a 2, b 4): utilisation spread mean" in render(report)
    screen = io.StringIO()
    console = Console(file=screen, width=140, color_system=None)
    console.print(summary(report))
    assert "utilisation spread mean / worst (capacities differ)" in screen.getvalue()
    png = write_plot(report, timeline_of(outcomes, fates), tmp_path / "hand.png")
    assert_png(png)
    json.dumps(report.to_json())  # everything serialisable


def assert_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert 10_000 < len(data) < 2_000_000, len(data)
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 800 and height >= 500
    return width, height


class FakeObserver:
    def active_sessions(self) -> dict[str, int]:
        return {"substation-1": 3, "substation-2": 7}

    def capacities(self) -> dict[str, int]:
        return {"substation-1": 10}


def test_live_view_renders_counters_without_the_sender():
    stats = SendStats()
    screen = io.StringIO()
    console = Console(file=screen, width=120, force_terminal=True, color_system=None)
    view = LiveView(
        stats,
        duration=30.0,
        scenario="seed x0.1",
        observer=FakeObserver(),
        console=console,
    )
    console.print(view.render())  # before the start
    assert "checking the gateway" in screen.getvalue()
    stats.started_mono, stats.started_at = time.monotonic(), time.time()
    for outcome in [
        _outcome(202, latency=0.005),
        _outcome(503),
        _outcome(error="refused"),
        _outcome(error="timeout"),
    ]:
        stats.sent += 1
        stats.record(outcome)
    console.print(view.render())
    stats.sending_done = True
    view.settling(1, 1)
    console.print(view.render())
    out = screen.getvalue()
    for text in (
        "sending",
        "5xx 1",
        "connection refused 1",
        "timeout 1",
        "p50 5.0 ms",
        "substation-1",
        "3/10",
        "settling",
        "1 / 1 accepted",
    ):
        assert text in out, text


# ------------------------------------------------------------------------------ the CLI
def test_help_lists_the_options():
    result = subprocess.run(
        [sys.executable, "-m", "loadgen", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    for option in (
        "--profile",
        "--burst",
        "--burst-every",
        "--seed",
        "--time-scale",
        "--no-progress",
        "--json",
        "--plot",
        "rush-hour",
        "spike",
    ):
        assert option in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--burst-every", "3"], "--burst-every needs --burst"),
        (["--burst", "5", "--profile", "spike"], "--burst cannot be combined with --profile"),
        (
            ["--burst", "5", "--arrivals", "poisson"],
            "--burst cannot be combined with --arrivals poisson",
        ),
        (["--scenario", "seed", "--profile", "spike"], "contradict"),
        (["--spike-factor", "3"], "--spike-factor only applies"),
        (["--rate", "1", "--interval", "2"], "not allowed with argument"),
        (["--rate", "-1"], "must be > 0"),
        (["--count", "many"], "not a number"),
        (["--profile", "lunch"], "invalid choice"),
        (["--give-up-after", "-1"], "must be >= 0"),
    ],
)
def test_argument_errors_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real HTTP server
class FakeGateway:
    """A tiny gateway on a free port. The path prefix picks the behaviour of POST .../charge:
    ``ok`` (202 with a request id), ``mixed`` (202, 422, 503, close, sleep in turn), ``die``
    (202 three times, then the server goes away), ``clients`` (202, 409 ev_busy, 429 in
    turn), ``auth`` (as ``ok``, but 401 to GET and POST .../charge without ``Bearer good``).
    Every POST's headers are kept in ``headers``."""

    SLEEP = 1.0
    TOKEN = "good"

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()
        self.headers: list[dict[str, str]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _refused(self) -> bool:
                """401, as the gateway answers, unless ``auth`` mode gets the good token."""
                mode = self.path.strip("/").split("/")[0]
                if mode != "auth" or self.headers.get("Authorization") == f"Bearer {gateway.TOKEN}":
                    return False
                self._json(401, {"error": "unauthorized", "detail": "the token is not valid"})
                return True

            def do_GET(self) -> None:
                if "/charge/" in self.path:
                    if not self._refused():
                        self._json(404, {"error": "not_found", "detail": "no such request"})
                    return
                self._json(200, {"status": "ok"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mode = self.path.strip("/").split("/")[0]
                with gateway.lock:
                    index = gateway.count
                    gateway.count += 1
                    gateway.headers.append(dict(self.headers))
                if self._refused():
                    return
                if mode == "auth":
                    mode = "ok"
                if mode == "clients":
                    mode = ("ok", "409", "429")[index % 3]
                if mode == "mixed":
                    mode = ("ok", "422", "503", "close", "sleep")[index % 5]
                if mode == "die":
                    if index == 2:
                        threading.Thread(target=gateway.stop, daemon=True).start()
                    mode = "ok" if index < 3 else "close"
                if mode == "ok":
                    self._json(
                        202,
                        {
                            "request_id": uuid.uuid4().hex,
                            "ev_id": body["ev_id"],
                            "status": "queued",
                        },
                    )
                elif mode in ("422", "503"):
                    self._json(int(mode), {"error": "no", "detail": mode})
                elif mode == "409":
                    self._json(409, {"error": "ev_busy", "detail": "EV1 is charging"})
                elif mode == "429":
                    self._json(429, {"error": "rate_limited", "detail": "1 request/s"})
                elif mode == "close":
                    self.close_connection = True  # no answer at all
                elif mode == "sleep":
                    time.sleep(gateway.SLEEP)
                    try:
                        self._json(202, {"request_id": uuid.uuid4().hex})
                    except OSError:
                        pass  # the client gave up

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self._stopped = False

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"

    def stop(self) -> None:
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    server = FakeGateway()
    yield server
    server.stop()


def test_each_kind_of_failure_is_counted_apart(
    gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "mixed.json"
    code = cli.main(
        [
            "--url",
            gateway.url("mixed"),
            "--no-observe",
            "--count",
            "10",
            "--rate",
            "100",
            "--timeout",
            "0.3",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert (report["sent"], report["accepted"]) == (10, 2)
    assert report["rejected"] == {"422": 2, "503": 2}
    assert report["rejected_by_class"] == {"4xx": 2, "5xx": 2}
    assert report["errors"] == {"disconnected": 2, "timeout": 2}
    printed = capsys.readouterr().out  # not a terminal: the plain report, no live view
    assert (
        "rejected 4 (4xx: 2 [422: 2]; 5xx: 2 [503: 2]), errors 4 (connection closed without an "
        "answer: 2, timeout: 2)" in printed
    )


def test_exit_3_when_nothing_listens(capsys: pytest.CaptureFixture):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert (
        cli.main(["--url", f"http://127.0.0.1:{port}", "--no-observe", "--count", "3"])
        == cli.EXIT_UNREACHABLE
    )
    captured = capsys.readouterr()
    assert "cannot reach the gateway" in captured.err and "Traceback" not in captured.err


def test_a_gateway_dying_mid_run_ends_it_with_the_counts(
    gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "died.json"
    code = cli.main(
        [
            "--url",
            gateway.url("die"),
            "--no-observe",
            "--rate",
            "40",
            "--duration",
            "20",
            "--give-up-after",
            "0.5",
            "--json",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == cli.EXIT_UNREACHABLE
    report = json.loads(out.read_text())
    assert report["accepted"] == 3
    assert report["errors"].get("refused", 0) > 0
    assert report["sent"] == report["accepted"] + sum(report["errors"].values())
    assert "refused connections" in report["stopped_early"]
    assert report["sent"] < 40 * 20  # it did not hammer a dead port for the whole duration
    assert "stopped early" in captured.out and "stopped early" in captured.err
    assert "Traceback" not in captured.err


def test_plot_and_json_with_the_new_fields(gateway: FakeGateway, tmp_path: Path):
    png, out = tmp_path / "run.png", tmp_path / "run.json"
    code = cli.main(
        [
            "--url", gateway.url("ok"), "--no-observe", "--profile", "spike", "--rate", "20",
            "--duration", "1", "--arrivals", "poisson", "--seed", "3",
            "--json", str(out), "--plot", str(png),
        ]
    )  # fmt: skip
    assert code == 0
    assert_png(png)
    report = json.loads(out.read_text())
    for key in (
        "send_rate",
        "accepted_per_s",
        "send_seconds",
        "rejected_by_class",
        "capacities",
        "stopped_early",
        "scenario",
        "started_at",
        "settings",
    ):
        assert key in report, key
    assert report["accepted"] == report["sent"] > 10
    assert report["send_rate"] > 0 and report["send_seconds"] > 0
    assert report["scenario"].startswith("spike")
    assert report["settings"]["profile"]["name"] == "spike" and report["settings"]["seed"] == 3
    assert "amqp_url" not in report["settings"]
    assert set(Report().to_json()) <= set(report)


def test_cancelling_the_sender_keeps_what_was_answered(gateway: FakeGateway):
    """What Ctrl-C does under asyncio.run: the sending task is cancelled, and the run ends
    with the answers so far instead of an exception."""
    stats = SendStats()

    async def run_and_cancel() -> list[Outcome]:
        task = asyncio.create_task(
            drive(
                gateway.url("ok"), constant_arrivals(0.01), count=None, duration=60.0,
                concurrency=8, timeout=5.0, ev_prefix="EV", stats=stats, interruptible=True,
            )
        )  # fmt: skip
        while stats.accepted < 5:
            await asyncio.sleep(0.01)
        task.cancel()
        return await task

    outcomes = asyncio.run(run_and_cancel())
    assert len(outcomes) >= 5 and all(o.accepted for o in outcomes)
    assert stats.stopped_early == "interrupted" and stats.sending_done


def test_a_run_with_the_live_view_on_a_non_terminal_still_reports(gateway: FakeGateway):
    result = run_load(
        LoadSettings(
            gateway_url=gateway.url("ok"), interval=0.01, duration=0.3, live=True, scenario="live"
        )
    )
    assert result.report.accepted == result.report.sent > 10
    # The schedule's end, or later if sending ran late.
    assert result.report.send_seconds is not None and result.report.send_seconds >= 0.3
    assert result.timeline is None and result.fates == {}


@pytest.mark.slow
def test_the_output_stays_clean_while_the_broker_goes_away_and_comes_back(stack_settings):
    """Issue 12: loadgen printed some fifty tracebacks during a broker restart. The whole stack
    and loadgen reach the broker through a proxy that the test cuts for a few seconds mid-run
    (to every client, the broker is gone, then back): loadgen's output has warnings at most,
    no traceback, and every request it had accepted completes."""
    from stack.local import start_stack
    from tests.proxy import CuttableProxy

    proxy = CuttableProxy(("127.0.0.1", 5672)).start()
    stack_settings.amqp_url = proxy.url(stack_settings.amqp_url) + "?heartbeat=2"
    stack_settings.session_seconds = 0.5
    stack_settings.poll_interval = 0.5
    group = start_stack(stack_settings)
    try:
        env = {**os.environ, "AMQP_URL": stack_settings.amqp_url}
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadgen",
                "--url",
                stack_settings.gateway_url,
                "--rate",
                "10",
                "--duration",
                "12",
                "--no-progress",
                "--settle-timeout",
                "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        time.sleep(4)
        proxy.cut()
        time.sleep(4)
        proxy.start()
        output, _ = run.communicate(timeout=120)
    finally:
        group.stop()
        proxy.cut()
    assert "Traceback" not in output, output
    assert "pika" not in output, output  # the Link's one-line warnings only
    assert "sent " in output and "accepted " in output, output
    assert "completed more than once 0" in output, output
    assert "unfinished 0" in output, output


# ------------------------------------------------------------------------------ clients (issue 14)
def test_every_request_carries_the_token_and_a_key_of_its_own(
    gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    token = tmp_path / "token"
    token.write_text(FakeGateway.TOKEN + "\n")  # as a secrets file may end
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(token))
    out = tmp_path / "auth.json"
    args = ["--url", gateway.url("auth"), "--no-observe", "--count", "6", "--rate", "100"]
    assert cli.main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["accepted"] == 6 and report["settings"]["token"] is True
    assert FakeGateway.TOKEN not in out.read_text()
    assert {h["Authorization"] for h in gateway.headers} == {"Bearer good"}
    keys = [h["Idempotency-Key"] for h in gateway.headers]
    assert len(set(keys)) == 6
    assert all(0 < len(k) <= 255 and k.isascii() and k.isprintable() for k in keys)
    # Another run: other keys (a key sent again would be a replay of the first run's request).
    assert cli.main(args) == 0
    assert not set(keys) & {h["Idempotency-Key"] for h in gateway.headers[6:]}


def test_a_missing_or_wrong_token_stops_the_run_before_sending_and_says_what_to_set(
    gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    args = ["--url", gateway.url("auth"), "--no-observe", "--count", "3"]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert cli.main(args) == cli.EXIT_UNAUTHORIZED
    err = capsys.readouterr().err
    assert "wants a client token" in err and TOKEN_ENV in err and "Traceback" not in err
    monkeypatch.setenv(TOKEN_ENV, "stolen")
    assert cli.main(args) == cli.EXIT_UNAUTHORIZED
    err = capsys.readouterr().err
    assert "refused loadgen's token (401: the token is not valid)" in err
    assert gateway.headers == []  # nothing was sent


def test_a_token_file_that_cannot_be_read_is_an_argument_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
):
    assert token_from_env({}) is None
    assert token_from_env({TOKEN_ENV: "t", TOKEN_FILE_ENV: "/nowhere"}) == "t"
    (tmp_path / "empty").write_text("")
    for path, why in ((tmp_path / "missing", "No such file"), (tmp_path / "empty", "empty")):
        with pytest.raises(ConfigError, match=why):
            token_from_env({TOKEN_FILE_ENV: str(path)})
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--no-observe", "--count", "1"])
    assert exit_.value.code == 2 and TOKEN_FILE_ENV in capsys.readouterr().err


def test_busy_evs_and_the_rate_limit_are_reported_as_such(
    gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "clients.json"
    args = ["--url", gateway.url("clients"), "--no-observe", "--count", "6", "--rate", "100"]
    assert cli.main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["rejected"] == {"409": 2, "429": 2}
    printed = capsys.readouterr().out
    assert (
        "409 (the EV already has an active request (one car, one session)), e.g.: ev_busy: EV1 "
        "is charging" in printed
    )
    assert "429 (over the client's rate limit (GATEWAY_RATE_LIMIT)), e.g.: rate_limited" in printed
    screen = io.StringIO()
    console = Console(file=screen, width=160, color_system=None)
    console.print(summary(build_report([_outcome(401)], None)))
    assert "401 (no client token, or a wrong one)" not in screen.getvalue()  # no example
    rejected = Outcome("EV1", 0.0, 0.01, status=401, detail="unauthorized: the token is not valid")
    console.print(summary(build_report([rejected], None)))
    assert "401 (no client token, or a wrong one), e.g.: unauthorized" in screen.getvalue()
