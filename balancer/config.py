from __future__ import annotations

from dataclasses import dataclass

from balancer.poller import DEFAULT_METRICS_HOSTS
from balancer.power_routing import DEFAULT_STRATEGY, STRATEGY_NAMES
from smartgrid import contract, grid, leases
from smartgrid.config import (
    DEFAULT_AMQP_URL,
    ConfigError,
    declare_topology_setting,
    min_turn_interval_setting,
    non_negative,
    positive,
    setting,
)
from smartgrid.senders import event_senders_setting


def _valid_static_list(entries: tuple[str, ...]) -> bool:
    try:
        parse_static_substations(entries)
    except ValueError:
        return False
    return True


def parse_static_substations(entries: tuple[str, ...]) -> dict[str, str]:
    """``("s1=http://host:9401/metrics", ...)`` -> ``{"s1": "http://host:9401/metrics"}``."""
    result = {}
    for entry in entries:
        substation, sep, url = entry.partition("=")
        substation, url = substation.strip(), url.strip()
        if (
            not sep
            or not contract.is_valid_substation_id(substation)
            or not url.startswith(("http://", "https://"))
        ):
            raise ValueError(entry)
        result[substation] = url
    return result


@dataclass(frozen=True)
class BalancerConfig:
    amqp_url: str = setting(
        "AMQP_URL", DEFAULT_AMQP_URL, "Broker URL; several, comma-separated, for a cluster"
    )
    poll_interval: float = setting(
        "POLL_INTERVAL",
        5.0,
        "Seconds between polls of every substation's /metrics",
        check=positive,
        expect="seconds > 0",
    )
    substations: tuple[str, ...] = setting(
        "SUBSTATIONS",
        (),
        "Optional static list of substations, id=metrics-url,... (others join by announcing "
        "themselves)",
        check=_valid_static_list,
        expect="comma-separated id=http://host:port/metrics entries",
    )
    strategy: str = setting(
        "BALANCER_STRATEGY",
        DEFAULT_STRATEGY,
        "How to choose a substation (power-min: the least utilised path after admission, "
        "power and points; the others count sessions only)",
        check=lambda name: name in STRATEGY_NAMES,
        expect="one of " + ", ".join(STRATEGY_NAMES),
    )
    prefetch: int = setting(
        "BALANCER_PREFETCH",
        200,
        "Pending requests taken from the queue at once (also the most held while all substations "
        "are full)",
        check=positive,
        expect="an integer > 0",
    )
    stale_after: float = setting(
        "STALE_AFTER",
        0.0,
        "A substation whose last good reading is older than this is not routed to (0: 3 x "
        "POLL_INTERVAL)",
        check=non_negative,
        expect="seconds >= 0",
    )
    drain_after: float = setting(
        "DRAIN_AFTER",
        0.0,
        "A substation without a good reading this long is presumed dead and the requests waiting "
        "in its queue go back to the pending queue (0: 2 x STALE_AFTER)",
        check=non_negative,
        expect="seconds >= 0",
    )
    forget_after: float = setting(
        "FORGET_AFTER",
        60.0,
        "An announced substation silent this long (no announcement, no reading) is forgotten "
        "(at least DRAIN_AFTER + POLL_INTERVAL, so that it is drained first)",
        check=positive,
        expect="seconds > 0",
    )
    delete_forgotten_queues: bool = setting(
        "DELETE_FORGOTTEN_QUEUES",
        True,
        "Delete the queue of a forgotten substation presumed dead once it is drained; 0 where "
        "announced substations check their queue passively (DECLARE_QUEUE=0): they could not "
        "declare it again",
    )
    poll_timeout: float = setting(
        "POLL_TIMEOUT",
        2.0,
        "Deadline of one /metrics fetch, from connecting to the last byte (at most POLL_INTERVAL)",
        check=positive,
        expect="seconds > 0",
    )
    metrics_hosts: tuple[str, ...] = setting(
        "METRICS_HOSTS",
        DEFAULT_METRICS_HOSTS,
        "Hosts a substation's metrics URL may name (patterns such as substation-*); other URLs, "
        "and any not http(s)://host[:port]/.../metrics, are never fetched",
        check=lambda hosts: bool(hosts) and all(hosts),
        expect="comma-separated host names or patterns",
    )
    metrics_port: int = setting(
        "METRICS_PORT",
        9400,
        "Port of the balancer's own /metrics",
        check=positive,
        expect="a TCP port",
    )
    metrics_bind: str = setting(
        "METRICS_BIND", "0.0.0.0", "Address the /metrics endpoint listens on"
    )
    balancer_id: str = setting(
        "BALANCER_ID", "", "Name in routed events and logs (default: balancer-<host>-<random>)"
    )
    seed: int = setting(
        "BALANCER_SEED", 0, "Seed of the tie-breaking random generator (0: unpredictable)"
    )
    declare_topology: bool = declare_topology_setting()
    min_turn_interval: float = min_turn_interval_setting()
    event_senders: tuple[str, ...] = event_senders_setting()
    topology_file: str = setting(
        grid.TOPOLOGY_ENV,
        "",
        "The grid's topology, a TOML file of [[node]] entries (id, parent, limit_kw; "
        "docs/power.md); empty: every substation is a root of its own, with the limit and "
        "parent it announces",
    )
    allocator: bool = setting(
        "ALLOCATOR",
        True,
        "Take part in handing out shares of the grid's limits (one balancer does at a time; "
        "the others stand by)",
    )
    lease_seconds: float = setting(
        "LEASE_SECONDS",
        3.0,
        "How long a share is in force at its substation unless renewed (renewed every third "
        "of it); a substation without one falls to its failsafe",
        check=lambda seconds: seconds > 2 * leases.CLOCK_SKEW_SECONDS,
        expect=f"seconds > {2 * leases.CLOCK_SKEW_SECONDS:g}",
    )
    failsafe_kw: float = setting(
        "SUBSTATION_FAILSAFE_KW",
        0.0,
        "What a substation under a grid node draws without a share, assumed for one not "
        "heard from yet (each reports its own); the same value as the substations'",
        check=non_negative,
        expect="kW >= 0",
    )
    allocator_heartbeat: int = setting(
        "ALLOCATOR_HEARTBEAT",
        2,
        "AMQP heartbeat of the allocator's own connection, in seconds: a frozen or cut-off "
        "allocator loses the power reports to a standby after about twice this",
        check=positive,
        expect="whole seconds > 0",
    )
    idempotency_ttl: int = setting(
        "IDEMPOTENCY_TTL",
        contract.IDEMPOTENCY_TTL_SECONDS,
        "Seconds a request id seen again means the same request (a copy, dropped); later, its "
        "client used the Idempotency-Key again (a new request). The gateways' value",
        check=positive,
        expect="seconds > 0",
    )
    log_level: str = setting("LOG_LEVEL", "INFO", "Logging level")

    def __post_init__(self) -> None:
        # A topology that cannot be used stops the balancer at once, with every problem.
        try:
            topology = grid.load_topology(self.topology_file) if self.topology_file else None
        except grid.TopologyError as exc:
            raise ConfigError(str(exc)) from None
        object.__setattr__(self, "_topology", topology or grid.Topology())

    @property
    def topology(self) -> grid.Topology:
        """The tree of GRID_TOPOLOGY_FILE, read once at start (empty without a file)."""
        return self._topology  # type: ignore[attr-defined]

    @property
    def effective_stale_after(self) -> float:
        return self.stale_after or 3 * self.poll_interval

    @property
    def effective_drain_after(self) -> float:
        return self.drain_after or 2 * self.effective_stale_after

    @property
    def effective_forget_after(self) -> float:
        # Forgotten before it was drained, a dead substation's queue would keep its requests.
        return max(self.forget_after, self.effective_drain_after + self.poll_interval)

    @property
    def effective_poll_timeout(self) -> float:
        return min(self.poll_timeout, self.poll_interval)
