"""The whole system as local processes: the same services and variables as docker-compose.

Each service's environment is built from its configuration's declarations
(:func:`smartgrid.config.environment`), and the defaults here are the services' own, so a
renamed variable or a changed default cannot leave the stack behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balancer.config import BalancerConfig
from gateway.config import GatewayConfig
from smartgrid.config import DEFAULT_AMQP_URL, default_of, environment
from stack.processes import ProcessGroup, ServiceProcess
from substation.config import SubstationConfig


@dataclass
class StackSettings:
    amqp_url: str = field(default_factory=lambda: os.environ.get("AMQP_URL", DEFAULT_AMQP_URL))
    substations: int = 3
    capacity: int = default_of(SubstationConfig, "capacity")
    capacities: tuple[int, ...] = ()  # per substation; overrides ``capacity`` when given
    session_seconds: float = default_of(SubstationConfig, "session_seconds")
    #: SIMULATED_HOUR_SECONDS of the substations (loadgen's --simulated-hour must match).
    simulated_hour_seconds: float = default_of(SubstationConfig, "simulated_hour_seconds")
    poll_interval: float = default_of(BalancerConfig, "poll_interval")
    strategy: str = default_of(BalancerConfig, "strategy")
    host: str = "127.0.0.1"
    gateway_port: int = default_of(GatewayConfig, "port")
    balancer_port: int = default_of(BalancerConfig, "metrics_port")
    substation_base_port: int = default_of(SubstationConfig, "metrics_port")
    substation_ports: tuple[int, ...] = ()  # explicit ports; overrides the base port
    gateway_workers: int = default_of(GatewayConfig, "workers")
    #: The module that serves the gateway; benchmarks put a baseline server in its place.
    gateway_module: str = "gateway"
    log_dir: Path = Path("out/logs")
    log_level: str = default_of(GatewayConfig, "log_level")
    #: Further variables for every service, by name (tests use it to reach into details).
    extra_env: dict[str, str] = field(default_factory=dict)
    #: The gateway's GATEWAY_TOKENS_FILE (stack.tokens); None: the API is open.
    tokens_file: Path | None = None

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


def _environment(config: type, settings: StackSettings, **values: Any) -> dict[str, str]:
    common = environment(config, amqp_url=settings.amqp_url, log_level=settings.log_level)
    return {**common, **environment(config, **values), **settings.extra_env}


def substation_process(settings: StackSettings, index: int) -> ServiceProcess:
    substation = settings.substation_ids()[index]
    port = settings.substation_port(index)
    metrics_url = f"http://{settings.host}:{port}/metrics"
    return ServiceProcess(
        name=substation,
        module="substation",
        env=_environment(
            SubstationConfig,
            settings,
            substation_id=substation,
            capacity=settings.capacity_of(index),
            session_seconds=settings.session_seconds,
            simulated_hour_seconds=settings.simulated_hour_seconds,
            metrics_port=port,
            metrics_bind=settings.host,
            metrics_url=metrics_url,
        ),
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
        env=_environment(
            BalancerConfig,
            settings,
            poll_interval=settings.poll_interval,
            strategy=settings.strategy,
            metrics_port=port,
            metrics_bind=settings.host,
        ),
        log_path=settings.log_dir / f"{name}.log",
        health_url=f"http://{settings.host}:{port}/metrics",
        ready_metric="balancer_broker_connected",
    )


def gateway_process(settings: StackSettings) -> ServiceProcess:
    tokens = {} if settings.tokens_file is None else {"tokens_file": settings.tokens_file.resolve()}
    return ServiceProcess(
        name="gateway",
        module=settings.gateway_module,
        env=_environment(
            GatewayConfig,
            settings,
            port=settings.gateway_port,
            bind=settings.host,
            workers=settings.gateway_workers,
            **tokens,
        ),
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
