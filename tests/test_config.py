"""Settings declared once: parsed from the environment, and rendered back into it."""

from __future__ import annotations

import pytest

from balancer.config import BalancerConfig
from gateway.config import GatewayConfig
from smartgrid.config import default_of, environment, from_env
from stack.local import StackSettings, balancer_process, gateway_process, substation_process
from substation.config import SubstationConfig


def test_an_environment_built_from_the_declarations_parses_back_to_the_same_settings():
    values = {
        "poll_interval": 0.25,
        "substations": ("s1=http://127.0.0.1:9401/metrics", "s2=http://127.0.0.1:9402/metrics"),
        "strategy": "random",
        "seed": 7,
    }
    config = from_env(BalancerConfig, environment(BalancerConfig, **values))
    assert {name: getattr(config, name) for name in values} == values


def test_a_setting_that_does_not_exist_is_an_error_not_a_silently_ignored_variable():
    with pytest.raises(TypeError, match="no setting sesion_seconds"):
        environment(SubstationConfig, sesion_seconds=1.0)


def test_the_stack_starts_each_service_with_the_settings_it_was_given():
    settings = StackSettings(capacities=(4, 6), substations=2, session_seconds=1.5)
    substation = from_env(SubstationConfig, substation_process(settings, 1).env)
    assert (substation.substation_id, substation.capacity, substation.session_seconds) == (
        "substation-2",
        6,
        1.5,
    )
    assert substation.metrics_port == settings.substation_port(1)
    balancer = from_env(BalancerConfig, balancer_process(settings).env)
    assert (balancer.poll_interval, balancer.strategy) == (
        settings.poll_interval,
        settings.strategy,
    )
    gateway = from_env(GatewayConfig, gateway_process(settings).env)
    assert (gateway.port, gateway.workers) == (settings.gateway_port, settings.gateway_workers)


def test_the_stack_defaults_are_the_services_own():
    settings = StackSettings()
    assert (
        settings.capacity
        == default_of(SubstationConfig, "capacity")
        == SubstationConfig(substation_id="x").capacity
    )
    assert settings.strategy == BalancerConfig().strategy
    assert settings.gateway_port == GatewayConfig().port


def test_a_substation_is_never_forgotten_before_it_is_drained():
    config = from_env(
        BalancerConfig, {"POLL_INTERVAL": "5", "DRAIN_AFTER": "100", "FORGET_AFTER": "60"}
    )
    assert config.effective_forget_after == 105
    assert from_env(BalancerConfig, {"FORGET_AFTER": "600"}).effective_forget_after == 600
