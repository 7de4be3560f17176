from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from smartgrid import contract, grid
from smartgrid.config import (
    DEFAULT_AMQP_URL,
    ConfigError,
    declare_topology_setting,
    min_turn_interval_setting,
    non_negative,
    positive,
    setting,
)
from smartgrid.power import kilowatts
from smartgrid.power_request import DEFAULT_HOUR_SECONDS
from smartgrid.senders import event_senders_setting
from substation.sharing import default_limit_kw

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubstationConfig:
    amqp_url: str = setting(
        "AMQP_URL", DEFAULT_AMQP_URL, "Broker URL; several, comma-separated, for a cluster"
    )
    substation_id: str = setting(
        "SUBSTATION_ID",
        "",
        "This substation's id: names its queue and labels its metrics (default: the host name, "
        "so scaled-out replicas get distinct ids)",
        check=contract.is_valid_substation_id,
        expect=contract.SUBSTATION_ID_RULE,
    )
    capacity: int = setting(
        "SUBSTATION_CAPACITY",
        10,
        "Charging points: sessions that can run at once",
        check=positive,
        expect="an integer > 0",
    )
    session_seconds: float = setting(
        "SESSION_SECONDS",
        30.0,
        "Length of one charging session",
        check=positive,
        expect="seconds > 0",
    )
    metrics_port: int = setting(
        "METRICS_PORT", 9401, "Port of the /metrics endpoint", check=positive, expect="a TCP port"
    )
    metrics_bind: str = setting(
        "METRICS_BIND", "0.0.0.0", "Address the /metrics endpoint listens on"
    )
    metrics_url: str = setting(
        "SUBSTATION_METRICS_URL",
        "",
        "URL the balancer polls, announced on start-up (default http://<hostname>:<METRICS_PORT>/metrics)",
    )
    announce_interval: float = setting(
        "ANNOUNCE_INTERVAL",
        5.0,
        "Seconds between announcements to balancers",
        check=positive,
        expect="seconds > 0",
    )
    duplicate_check_seconds: float = setting(
        "DUPLICATE_CHECK_SECONDS",
        1.0,
        "How long to wait for other substations' answers before charging a possible duplicate",
        check=positive,
        expect="seconds > 0",
    )
    shutdown_grace: float = setting(
        "SHUTDOWN_GRACE",
        10.0,
        "On SIGTERM, sessions ending within this many seconds finish; later ones go back to the "
        "queue",
        check=non_negative,
        expect="seconds >= 0",
    )
    cancel_lookback: float = setting(
        "CANCEL_LOOKBACK",
        3600.0,
        "At start, replay this many seconds of the history stream for the cancels of requests "
        "that waited in its queue while it was down",
        check=non_negative,
        expect="seconds >= 0",
    )
    declare_topology: bool = declare_topology_setting()
    min_turn_interval: float = min_turn_interval_setting()
    event_senders: tuple[str, ...] = event_senders_setting()
    declare_queue: bool = setting(
        "DECLARE_QUEUE",
        True,
        "Declare its own queue; 0: only check that it exists, for a broker whose definitions "
        "declare it (definitions --admin-declares-topology --substation-users)",
    )
    power_limit_kw: float = setting(
        "SUBSTATION_POWER_LIMIT_KW",
        0.0,
        "What its sessions may draw together, in kW (0: 350 kW per charging point, which never "
        "binds); the topology file's limit of this substation lowers it",
        check=non_negative,
        expect="kW >= 0",
    )
    failsafe_kw: float = setting(
        "SUBSTATION_FAILSAFE_KW",
        0.0,
        "What its sessions may draw together once its share of its parent's limit has run out "
        "(or before the first share arrives), in kW; only for a substation under a grid node",
        check=non_negative,
        expect="kW >= 0",
    )
    parent: str = setting(
        "SUBSTATION_PARENT",
        "",
        "The grid node (feeder) it sits under, announced to the balancers; the topology file "
        "wins on a conflict. With a parent it draws only its share of the parent's limit, "
        "and its failsafe when no share is in force (empty: none, unless the file names one)",
        check=lambda parent: parent == "" or contract.is_valid_substation_id(parent),
        expect=contract.SUBSTATION_ID_RULE,
    )
    topology_file: str = setting(
        grid.TOPOLOGY_ENV,
        "",
        "The grid's topology (TOML, docs/power.md), the balancers' file: read for this "
        "substation's parent and limit (empty: none)",
    )
    simulated_hour_seconds: float = setting(
        "SIMULATED_HOUR_SECONDS",
        DEFAULT_HOUR_SECONDS,
        "Real seconds per simulated hour of charging: energy is delivered at the allotted power "
        "in simulated time (3600: real time)",
        check=positive,
        expect="seconds > 0",
    )
    demand_interval: float = setting(
        "DEMAND_INTERVAL",
        1.0,
        "Most seconds between two power.demand reports (one also goes out on every change of a "
        "managed substation)",
        check=positive,
        expect="seconds > 0",
    )
    demand_min_interval: float = setting(
        "DEMAND_MIN_INTERVAL",
        0.1,
        "Least seconds between two power.demand reports: changes within them go in one",
        check=lambda value: value >= 0,
        expect="seconds >= 0",
    )
    log_level: str = setting("LOG_LEVEL", "INFO", "Logging level")

    def __post_init__(self) -> None:
        if not self.substation_id:
            hostname = socket.gethostname().split(".")[0]
            if not contract.is_valid_substation_id(hostname):
                raise ConfigError(
                    f"host name {hostname!r} is not a valid substation id; set SUBSTATION_ID"
                )
            object.__setattr__(self, "substation_id", hostname)
        if self.topology_file:
            try:
                self._place(grid.load_topology(self.topology_file))
            except grid.TopologyError as exc:
                raise ConfigError(str(exc)) from None

    def _place(self, topology: grid.Topology) -> None:
        """Its parent and limit as the topology file says (the file wins over the settings'
        parent; the lower limit holds)."""
        node = topology.nodes.get(self.substation_id)
        if node is None:
            return
        if node.parent is not None and self.parent and self.parent != node.parent:
            log.warning(
                "SUBSTATION_PARENT=%s, but %s puts %s under %s: the file wins",
                self.parent,
                self.topology_file,
                self.substation_id,
                node.parent,
            )
        if node.parent is not None:
            object.__setattr__(self, "parent", node.parent)
        object.__setattr__(self, "power_limit_kw", min(self.limit_kw, kilowatts(node.limit_w)))

    @property
    def limit_kw(self) -> float:
        """SUBSTATION_POWER_LIMIT_KW, or the limit that never binds."""
        return self.power_limit_kw or default_limit_kw(self.capacity)

    @property
    def advertised_metrics_url(self) -> str:
        return self.metrics_url or f"http://{socket.gethostname()}:{self.metrics_port}/metrics"
