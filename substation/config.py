from __future__ import annotations

import socket
from dataclasses import dataclass

from smartgrid import contract
from smartgrid.config import (
    DEFAULT_AMQP_URL,
    ConfigError,
    declare_topology_setting,
    non_negative,
    positive,
    setting,
)
from smartgrid.senders import event_senders_setting


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
    declare_topology: bool = declare_topology_setting()
    event_senders: tuple[str, ...] = event_senders_setting()
    declare_queue: bool = setting(
        "DECLARE_QUEUE",
        True,
        "Declare its own queue; 0: only check that it exists, for a broker whose definitions "
        "declare it (definitions --admin-declares-topology --substation-users)",
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

    @property
    def advertised_metrics_url(self) -> str:
        return self.metrics_url or f"http://{socket.gethostname()}:{self.metrics_port}/metrics"
