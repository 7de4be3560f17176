"""The whole system as local processes: the same services and variables as docker-compose."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from smartgrid.config import DEFAULT_AMQP_URL
from stack.processes import ProcessGroup, ServiceProcess


@dataclass
class StackSettings:
    amqp_url: str = field(default_factory=lambda: os.environ.get("AMQP_URL", DEFAULT_AMQP_URL))
    substations: int = 3
    capacity: int = 10
    capacities: tuple[int, ...] = ()  # per substation; overrides ``capacity`` when given
    session_seconds: float = 30.0
    poll_interval: float = 5.0
    strategy: str = "corrected-min"
    host: str = "127.0.0.1"
    gateway_port: int = 8000
    balancer_port: int = 9400
    substation_base_port: int = 9401
    substation_ports: tuple[int, ...] = ()  # explicit ports; overrides the base port
    gateway_workers: int = 2
    log_dir: Path = Path("out/logs")
    log_level: str = "INFO"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    def substation_ids(self) -> list[str]:
        return [f"substation-{i}" for i in range(1, self.substations + 1)]

    def substation_port(self, index: int) -> int:
        if self.substation_ports:
            return self.substation_ports[index]
        return self.substation_base_port + index

    def capacity_of(self, index: int) -> int:
        return self.capacities[index] if self.capacities else self.capacity


def _common_env(settings: StackSettings) -> dict[str, str]:
    return {"AMQP_URL": settings.amqp_url, "LOG_LEVEL": settings.log_level, **settings.extra_env}


def substation_process(settings: StackSettings, index: int) -> ServiceProcess:
    substation = settings.substation_ids()[index]
    port = settings.substation_port(index)
    metrics_url = f"http://{settings.host}:{port}/metrics"
    return ServiceProcess(
        name=substation,
        module="substation",
        env={
            **_common_env(settings),
            "SUBSTATION_ID": substation,
            "SUBSTATION_CAPACITY": str(settings.capacity_of(index)),
            "SESSION_SECONDS": str(settings.session_seconds),
            "METRICS_PORT": str(port),
            "METRICS_BIND": settings.host,
            "SUBSTATION_METRICS_URL": metrics_url,
        },
        log_path=settings.log_dir / f"{substation}.log",
        health_url=metrics_url,
        ready_metric="substation_broker_connected",
    )


def balancer_process(
    settings: StackSettings, name: str = "balancer", port: int | None = None
) -> ServiceProcess:
    port = port or settings.balancer_port
    return ServiceProcess(
        name=name,
        module="balancer",
        env={
            **_common_env(settings),
            "POLL_INTERVAL": str(settings.poll_interval),
            "BALANCER_STRATEGY": settings.strategy,
            "METRICS_PORT": str(port),
            "METRICS_BIND": settings.host,
        },
        log_path=settings.log_dir / f"{name}.log",
        health_url=f"http://{settings.host}:{port}/metrics",
        ready_metric="balancer_broker_connected",
    )


def gateway_process(settings: StackSettings) -> ServiceProcess:
    return ServiceProcess(
        name="gateway",
        module="gateway",
        env={
            **_common_env(settings),
            "GATEWAY_PORT": str(settings.gateway_port),
            "GATEWAY_BIND": settings.host,
            "GATEWAY_WORKERS": str(settings.gateway_workers),
        },
        log_path=settings.log_dir / "gateway.log",
        health_url=f"{settings.gateway_url}/health",
    )


def start_stack(settings: StackSettings, *, timeout: float = 30.0) -> ProcessGroup:
    """Start substations, then the balancer, then the gateway, each once healthy.

    On failure everything already started is stopped again before the error propagates.
    """
    group = ProcessGroup()
    try:
        substations = [
            group.add(substation_process(settings, i)) for i in range(settings.substations)
        ]
        for service in substations:
            service.wait_healthy(timeout)
        group.add(balancer_process(settings)).wait_healthy(timeout)
        group.add(gateway_process(settings)).wait_healthy(timeout)
    except BaseException:
        group.stop()
        raise
    return group
