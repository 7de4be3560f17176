"""The Grafana dashboard "smartgrid", built from code.

``make dashboard`` (``python -m monitoring.dashboard``) writes monitoring/grafana/dashboards/
smartgrid.json, the file Grafana provisions; tests/test_dashboard.py fails while the committed
file differs from what this module builds. Edit this module, never the JSON.

:func:`dashboard` lists the rows and their panels, top to bottom; each panel is a function below
it. Grafana's grafana-foundation-sdk builders lay the panels out left to right, wrapping at the
grid's 24 columns, and a row header starts a new line, so a panel is added by writing its
function and naming it in its row. The code states only what differs from Grafana's defaults.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from grafana_foundation_sdk.builders import bargauge, gauge, stat, timeseries
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    FieldColor,
    QueryVariable,
    Row,
    ThresholdsConfig,
    TimePicker,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import QueryEditorMode

from smartgrid import contract

AnyPanel = TypeVar("AnyPanel", timeseries.Panel, gauge.Panel, bargauge.Panel, stat.Panel)

OUTPUT = Path(__file__).resolve().parent / "grafana/dashboards/smartgrid.json"
REGENERATE = "make dashboard"

#: provisioning/datasources/prometheus.yml gives the datasource this uid.
PROMETHEUS = model.DataSourceRef(type_val="prometheus", uid="prometheus")

# What a substation exposes and the balancer reads is named in the contract. The other metrics
# are named where the services define them (README.md, "Metrics"); tests/test_monitoring.py
# checks every name a panel reads against README and against what a running stack exposes.
LOAD = contract.LOAD_METRIC
CAPACITY = contract.CAPACITY_METRIC
INFO = contract.INFO_METRIC

#: smartgrid's own queues, as a PromQL regular expression on RabbitMQ's ``queue`` label.
QUEUES = "|".join(
    (
        contract.PENDING_QUEUE.replace(".", "[.]"),
        contract.DEAD_LETTER_QUEUE.replace(".", "[.]"),
        contract.SUBSTATION_QUEUE_PREFIX.replace(".", "[.]") + ".+",
    )
)

#: The LoadImbalance alert fires while the spread stays above this (rules/smartgrid.yml).
LOAD_IMBALANCE_ABOVE = 3


def dashboard() -> Dashboard:
    board = (
        Dashboard("smartgrid")
        .uid("smartgrid")
        .description(
            "EV charging load across substations: balance, routing, broker queues, latency,"
            " failures."
        )
        .tags(["smartgrid"])
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .time("now-30m", "now")
        .refresh("10s")
        .timepicker(TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m"]))
        .annotations([])
        .with_variable(variable("substation", "Substation", f"label_values({LOAD}, substation)"))
        .with_variable(
            variable(
                "vhost", "RabbitMQ vhost", "label_values(rabbitmq_detailed_queue_messages, vhost)"
            )
        )
    )
    rows: dict[str, list[cogbuilder.Builder[model.Panel]]] = {
        "Load and balance": [
            load_per_substation(),
            charging_points_in_use(),
            peak_load(),
            load_spread(),
            balance_indices(),
        ],
        "Power and grid limits": [
            power_per_substation(),
            power_per_grid_node(),
            paused_sessions(),
            waits_per_class(),
            energy_delivered(),
            lease_left(),
            allocator(),
        ],
        "Routing": [routing_rate(), estimate_against_reported_load()],
        "Broker queues": [messages_waiting(), messages_unacknowledged()],
        "Latency": [accept_latency(), wait_to_start()],
        "Outcomes and failures": [
            gateway_outcomes(),
            dead_letters_and_failed_forwards(),
            gateway_history_relay(),
        ],
        "Health": [substations_up(), broker_connections(), held_requests(), restarts()],
        "Balancer internals": [age_of_readings(), decision_time()],
    }
    for title, panels in rows.items():
        board.with_row(Row(title))
        for each in panels:
            board.with_panel(each)
    return board


# -------------------------------------------------------------------------- Load and balance


def load_per_substation() -> timeseries.Panel:
    return graph(
        "Load per substation",
        "Charging sessions running on each substation (substation_current_load), scraped every"
        " 5 s: the graph of the original problem. Dashed: its charging points.",
        query(f"sum by (substation) ({selected(LOAD)})", "{{substation}}"),
        query(f"sum by (substation) ({selected(CAPACITY)})", "{{substation}} charging points"),
        width=16,
        height=9,
        steps=True,
        decimals=0,
    ).override_by_query("B", LIMIT_LINE)


def charging_points_in_use() -> gauge.Panel:
    return (
        panel(
            gauge.Panel(),
            "Charging points in use",
            "Current load of each substation as a share of its charging points"
            " (substation_current_load / substation_capacity).",
            query(
                f"sum by (substation) ({selected(LOAD)})"
                f" / sum by (substation) ({selected(CAPACITY)})",
                "{{substation}}",
            ),
            width=8,
            height=9,
            unit="percentunit",
        )
        .min(0)
        .max(1)
        .decimals(0)
        .color_scheme(BY_THRESHOLDS)
        .thresholds(steps("green", (0.8, "orange"), (0.95, "red")))
        .reduce_options(LAST_VALUE)
    )


def peak_load() -> bargauge.Panel:
    return (
        panel(
            bargauge.Panel(),
            "Peak load in the time range",
            "Most sessions each substation ran at once in the dashboard's time range"
            " (max_over_time of substation_current_load).",
            query(
                f"max by (substation) (max_over_time({selected(LOAD)}[$__range]))",
                "{{substation}}",
                instant=True,
            ),
            width=8,
        )
        .min(0)
        .decimals(0)
        .color_scheme(BY_THRESHOLDS)
        .thresholds(steps("blue"))
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .reduce_options(LAST_VALUE)
    )


def load_spread() -> timeseries.Panel:
    return (
        graph(
            "Load spread (max − min sessions)",
            "Difference in running sessions between the most and the least loaded substation."
            " The balancer keeps it within 1 nearly always; the original design reached 6. The"
            f" LoadImbalance alert fires above {LOAD_IMBALANCE_ABOVE} for 5 minutes (red area).",
            query(f"max({selected(LOAD)}) - min({selected(LOAD)})", "max − min"),
            width=8,
            steps=True,
            decimals=0,
        )
        # Halfway to the next whole session, so that a spread of exactly the limit stays clear.
        .thresholds(steps("transparent", (LOAD_IMBALANCE_ABOVE + 0.5, "red")))
        .thresholds_style(
            GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE_AND_AREA)
        )
    )


def balance_indices() -> timeseries.Panel:
    return graph(
        "Balance indices",
        "Jain's fairness index of the load (1 = perfectly even, 1/n = everything on one"
        " substation) and its coefficient of variation, stddev / mean (0 = even). Both over all"
        " substations (recording rules smartgrid:load_jain_index and smartgrid:load_cv).",
        query("smartgrid:load_jain_index", "Jain's index (1 = even)"),
        query("smartgrid:load_cv", "stddev / mean (0 = even)"),
        width=8,
        unit="none",
    )


# --------------------------------------------------------------------- Power and grid limits
# The substation and balancer expose these from wave 3 of issue 15 (tests/test_monitoring.py
# lists them as awaited until then).


def power_per_substation() -> timeseries.Panel:
    return (
        graph(
            "Power per substation (kW)",
            "What each substation's sessions draw (substation_power_kw) against the limit in force"
            " there (dashed: its own limit, its share of the feeder's, or the failsafe once its"
            " lease ran out), and what its cars would draw unconstrained (dotted: the sum of their"
            " maxima; above the drawn power while sessions are curtailed). Above the dashed line"
            " for 15 s: GridNodeOverLimit.",
            query(f"sum by (substation) ({selected(contract.POWER_METRIC)})", "{{substation}}"),
            query(
                f"sum by (substation) ({selected(contract.POWER_LIMIT_METRIC)})",
                "{{substation}} limit",
            ),
            query(
                f"sum by (substation) ({selected(contract.POWER_DEMAND_METRIC)})",
                "{{substation}} demand",
            ),
            unit="kwatt",
        )
        .override_by_query("B", LIMIT_LINE)
        .override_by_query("C", DOTTED_LINE)
    )


def power_per_grid_node() -> timeseries.Panel:
    node = contract.NODE_LABEL
    return graph(
        "Power per grid node (kW)",
        "What the substations under each node of the grid tree (feeders, sites) draw, from"
        " their reports, against the node's limit in force (dashed: the topology file's, or an"
        " operator's override). Every balancer computes the same; the highest is shown.",
        query(f"max by ({node}) ({contract.NODE_POWER_METRIC})", f"{{{{{node}}}}}"),
        query(f"max by ({node}) ({contract.NODE_LIMIT_METRIC})", f"{{{{{node}}}}} limit"),
        unit="kwatt",
    ).override_by_query("B", LIMIT_LINE)


def paused_sessions() -> timeseries.Panel:
    label = contract.PRIORITY_LABEL
    return graph(
        "Paused sessions per class",
        "Sessions whose minimum power did not fit under their substation's limit: at 0 kW,"
        " keeping their charging point, and resuming first when power frees"
        f" ({contract.PAUSED_METRIC}).",
        query(f"sum by ({label}) ({selected(contract.PAUSED_METRIC)})", f"{{{{{label}}}}}"),
        width=8,
        steps=True,
        decimals=0,
    )


def waits_per_class() -> timeseries.Panel:
    label = contract.PRIORITY_LABEL
    waits = selected(f"{contract.WAIT_METRIC}_bucket")
    return graph(
        "Wait to start per class",
        "From acceptance to the session's start, per priority class (p50, p99): emergency is"
        " released first, fleet and standard by weight, each with a guaranteed share.",
        query(quantile(0.5, waits, by=label), f"{{{{{label}}}}} p50"),
        query(quantile(0.99, waits, by=label), f"{{{{{label}}}}} p99"),
        width=8,
        unit="s",
    )


def energy_delivered() -> bargauge.Panel:
    return (
        panel(
            bargauge.Panel(),
            "Energy delivered in the time range (kWh)",
            "Energy each substation delivered in the dashboard's time range, in simulated kWh"
            f" (increase of {contract.ENERGY_METRIC}_total; SIMULATED_HOUR_SECONDS real"
            " seconds make an hour).",
            query(
                "sum by (substation)"
                f" (increase({selected(contract.ENERGY_METRIC + '_total')}[$__range]))",
                "{{substation}}",
                instant=True,
            ),
            width=8,
            unit="kwatth",
        )
        .min(0)
        .decimals(1)
        .color_scheme(BY_THRESHOLDS)
        .thresholds(steps("green"))
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .reduce_options(LAST_VALUE)
    )


def lease_left() -> timeseries.Panel:
    return (
        graph(
            "Lease left per substation",
            "Seconds until each substation's share of its parent's limit runs out, renewed"
            " about every second by the active allocator. At 0 (red) it draws at most its"
            f" failsafe, SUBSTATION_FAILSAFE_KW ({contract.LEASE_METRIC}; only substations"
            " under a grid node have one).",
            query(f"min by (substation) ({selected(contract.LEASE_METRIC)})", "{{substation}}"),
            width=16,
            unit="s",
        )
        .thresholds(steps("red", (0.001, "transparent")))
        .thresholds_style(
            GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE_AND_AREA)
        )
    )


def allocator() -> stat.Panel:
    return (
        panel(
            stat.Panel(),
            "Share allocators and overcommitted nodes",
            "Balancers whose allocator hands out the shares: exactly one (red at 0 or 2);"
            " and grid nodes whose limit cannot cover the failsafes of the substations under"
            " them, where a lapsed lease could overload them (GridNodeOvercommitted).",
            query(f"sum({contract.ALLOCATOR_ACTIVE_METRIC})", "active allocators"),
            query(
                f"sum(max by ({contract.NODE_LABEL}) ({contract.NODE_OVERCOMMITTED_METRIC}))",
                "overcommitted nodes",
            ),
            width=8,
            height=8,
        )
        .color_scheme(BY_THRESHOLDS)
        .thresholds(steps("green", (1, "orange")))
        .override_by_query("A", [setting("thresholds", _EXACTLY_ONE)])
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(LAST_VALUE)
    )


_EXACTLY_ONE = {
    "mode": "absolute",
    "steps": [
        {"value": None, "color": "red"},
        {"value": 1, "color": "green"},
        {"value": 2, "color": "red"},
    ],
}


# ----------------------------------------------------------------------------------- Routing


def routing_rate() -> timeseries.Panel:
    return graph(
        "Routing rate per substation",
        "Requests per second the balancer forwards to each substation (confirmed by the broker).",
        query(
            "sum by (substation)"
            f" (rate({selected('balancer_routed_requests_total')}[$__rate_interval]))",
            "{{substation}}",
        ),
        unit="reqps",
    )


def estimate_against_reported_load() -> timeseries.Panel:
    return graph(
        "Balancer's estimate vs reported load",
        "What the balancer believes each substation is running (its poll corrected by what it"
        " routed and the completions it saw since) against what the substation reports. They"
        " should match within a session.",
        query(selected("balancer_estimated_load"), "{{substation}} estimate ({{instance}})"),
        query(f"sum by (substation) ({selected(LOAD)})", "{{substation}} reported"),
        steps=True,
        decimals=0,
    ).override_by_query("A", [DASHED])


# ----------------------------------------------------------------------------- Broker queues


def messages_waiting() -> timeseries.Panel:
    return graph(
        "Broker queues: messages waiting",
        "Ready messages in each smartgrid queue (RabbitMQ per-queue metrics). smartgrid.pending.v2:"
        " accepted requests the balancer has not taken yet; smartgrid.substation.<id>: routed"
        " requests waiting for a charging point; smartgrid.dead-letters: requests set aside.",
        each_queue("rabbitmq_detailed_queue_messages_ready"),
        decimals=0,
    )


def messages_unacknowledged() -> timeseries.Panel:
    return graph(
        "Broker queues: delivered, not yet acknowledged",
        "Unacknowledged messages per queue: on smartgrid.pending.v2 the requests the balancer is"
        " holding or forwarding; on a substation's queue its running sessions (acknowledged when"
        " the session completes).",
        each_queue("rabbitmq_detailed_queue_messages_unacked"),
        decimals=0,
    )


# ----------------------------------------------------------------------------------- Latency


def accept_latency() -> timeseries.Panel:
    return graph(
        "Request accept latency (gateway)",
        "Time to answer POST /charge with 202: broker confirmation plus the wait for the routing"
        " decision (gateway_accept_seconds); and the broker confirmation alone"
        " (gateway_publish_seconds, p99).",
        query(quantile(0.5, "gateway_accept_seconds_bucket"), "accept p50"),
        query(quantile(0.95, "gateway_accept_seconds_bucket"), "accept p95"),
        query(quantile(0.99, "gateway_accept_seconds_bucket"), "accept p99"),
        query(quantile(0.99, "gateway_publish_seconds_bucket"), "broker confirm p99"),
        unit="s",
    )


def wait_to_start() -> timeseries.Panel:
    waits = selected("substation_wait_seconds_bucket")
    return graph(
        "Wait from acceptance to session start",
        "From the gateway accepting a request to its charging session starting, per substation"
        " (substation_wait_seconds): near zero while a point is free, up to a session's length"
        " when the grid is full.",
        query(quantile(0.5, waits, by="substation"), "{{substation}} p50"),
        query(quantile(0.99, waits, by="substation"), "{{substation}} p99"),
        unit="s",
    )


# --------------------------------------------------------------------- Outcomes and failures


def gateway_outcomes() -> timeseries.Panel:
    colours = {"accepted": "green", "invalid": "orange", "unavailable": "red"}
    panel_ = (
        graph(
            "Gateway request outcomes",
            "POST /charge answers per second: accepted (202), invalid (4xx, the client's fault)"
            " and unavailable (503, the broker did not confirm).",
            query(
                "sum by (outcome) (rate(gateway_charge_requests_total[$__rate_interval]))",
                "{{outcome}}",
            ),
            unit="reqps",
        )
        .fill_opacity(30)
        .stacking(StackingConfig().mode(common.StackingMode.NORMAL).group("A"))
    )
    for outcome, colour in colours.items():
        panel_.override_by_name(outcome, [fixed_colour(colour)])
    return panel_


def dead_letters_and_failed_forwards() -> timeseries.Panel:
    return graph(
        "Dead letters and failed forwards",
        "Messages sitting in smartgrid.dead-letters (per vhost), requests the balancer set aside"
        " as invalid, and forwards the broker did not confirm (retried, not lost).",
        query(
            "sum by (vhost) (rabbitmq_detailed_queue_messages"
            f'{{vhost=~"$vhost", queue="{contract.DEAD_LETTER_QUEUE}"}})',
            f"in {contract.DEAD_LETTER_QUEUE} ({{{{vhost}}}})",
        ),
        query(
            "sum(increase(balancer_dead_lettered_requests_total[$__rate_interval]))",
            "set aside by the balancer",
        ),
        query(
            "sum(increase(balancer_dispatch_failures_total[$__rate_interval])) or vector(0)",
            "forwards not confirmed",
        ),
        decimals=0,
    )


def gateway_history_relay() -> timeseries.Panel:
    return graph(
        "Gateway history relay",
        "Gateway workers by how they read the request history: relay (reads the stream for the"
        " host's other workers), relayed (fed by it), stream (reads it itself: a lone worker,"
        " replaying, or fallen back); and fallbacks to the stream by cause. Repeated ones:"
        " GatewayHistoryRelayFallingBack.",
        query("sum by (mode) (gateway_history_reading)", "{{mode}}"),
        query(
            "sum by (cause) (increase(gateway_history_relay_fallbacks_total[$__rate_interval]))",
            "fallbacks: {{cause}}",
        ),
        steps=True,
        decimals=0,
    )


# ------------------------------------------------------------------------------------ Health


def substations_up() -> stat.Panel:
    return status(
        "Substations up",
        "Whether the balancer considers each substation eligible (fresh metrics, not leaving),"
        " and whether Prometheus can scrape it.",
        query(f"min by (substation) ({selected('balancer_substation_up')})", "{{substation}}"),
        query('up{job="substations"}', "scrape {{instance}}"),
        down="down",
        up="up",
    )


def broker_connections() -> stat.Panel:
    return status(
        "Broker connections",
        "1 while the service is connected to RabbitMQ and consuming; and whether Prometheus can"
        " scrape RabbitMQ itself.",
        query("balancer_broker_connected", "balancer {{instance}}"),
        query("substation_broker_connected", "{{substation}}"),
        query('up{job="rabbitmq"}', "RabbitMQ scrape"),
        query("gateway_broker_connected", "gateway"),
        down="disconnected",
        up="connected",
    )


def held_requests() -> stat.Panel:
    return (
        count(
            "Held requests",
            "Requests the balancer is holding because no substation has a free charging point."
            " Sustained for 5 minutes: CapacityExhausted.",
            query("sum(balancer_held_requests)", "held"),
        )
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.VALUE)
    )


def restarts() -> stat.Panel:
    return count(
        "Substation restarts in the time range",
        "Process starts of each substation seen in the time range, beyond the first (distinct"
        f" {contract.INFO_INSTANCE_LABEL} values of {INFO}).",
        query(
            f"count by (substation) (count_over_time({selected(INFO)}[$__range])) - 1",
            "{{substation}}",
            instant=True,
        ),
    )


# ---------------------------------------------------------------------- Balancer internals


def age_of_readings() -> timeseries.Panel:
    return graph(
        "Age of the balancer's readings",
        "Seconds since the balancer's last good poll of each substation's /metrics (ineligible"
        " after STALE_AFTER), and failed polls (right axis).",
        query(
            f"max by (substation) ({selected('balancer_substation_metrics_age_seconds')})",
            "{{substation}} age",
        ),
        query(
            "sum(increase(balancer_poll_errors_total[$__rate_interval])) or vector(0)",
            "failed polls",
        ),
        unit="s",
    ).override_by_query(
        "B",
        [
            setting("unit", "short"),
            setting("decimals", 0),
            setting("custom.axisPlacement", "right"),
            setting("custom.drawStyle", "bars"),
        ],
    )


def decision_time() -> timeseries.Panel:
    return graph(
        "Balancer decision time",
        "Time the balancer takes to choose a substation for one request"
        " (balancer_decision_seconds).",
        query(quantile(0.5, "balancer_decision_seconds_bucket"), "p50"),
        query(quantile(0.99, "balancer_decision_seconds_bucket"), "p99"),
        unit="s",
    )


# ------------------------------------------------------------------------ PromQL and styling


def selected(metric: str) -> str:
    """The metric's series of the substations chosen in the dashboard's variable."""
    return f'{metric}{{substation=~"$substation"}}'


def each_queue(metric: str) -> Dataquery:
    """A RabbitMQ per-queue metric of each of smartgrid's queues, in the vhosts chosen."""
    return query(f'sum by (queue) ({metric}{{vhost=~"$vhost", queue=~"{QUEUES}"}})', "{{queue}}")


def quantile(q: float, buckets: str, *, by: str = "") -> str:
    """The q-quantile of a histogram's buckets (a metric name, with matchers if any)."""
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({buckets}[$__rate_interval])))"


def query(expr: str, legend: str, *, instant: bool = False) -> Dataquery:
    target = Dataquery().expr(expr).legend_format(legend).editor_mode(QueryEditorMode.CODE)
    return target.instant() if instant else target.range()


def variable(name: str, label: str, values: str) -> QueryVariable:
    """A template variable over a label's values, all selected by default."""
    return (
        QueryVariable(name)
        .label(label)
        .datasource(PROMETHEUS)
        # qryType 1 is "label values", as Grafana's Prometheus variable editor saves it.
        .query({"qryType": 1, "query": values, "refId": "PrometheusVariableQueryEditor"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def panel(
    builder: AnyPanel,
    title: str,
    description: str,
    *queries: Dataquery,
    width: int = 12,
    height: int = 8,
    unit: str = "short",
) -> AnyPanel:
    builder.title(title).description(description).datasource(PROMETHEUS)
    builder.span(width).height(height).unit(unit)
    for ref_id, target in zip(string.ascii_uppercase, queries, strict=False):
        builder.with_target(target.ref_id(ref_id).datasource(PROMETHEUS))
    return builder


def graph(
    title: str,
    description: str,
    *queries: Dataquery,
    width: int = 12,
    height: int = 8,
    unit: str = "short",
    steps: bool = False,
    decimals: int | None = None,
) -> timeseries.Panel:
    """A time series from 0 up; ``steps`` for counts that jump (sessions, queue lengths)."""
    builder = (
        panel(
            timeseries.Panel(), title, description, *queries, width=width, height=height, unit=unit
        )
        .min(0)
        .line_width(2)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .line_interpolation(
            common.LineInterpolation.STEP_AFTER if steps else common.LineInterpolation.LINEAR
        )
        .legend(VizLegendOptions().show_legend(True))
        .tooltip(
            VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if decimals is not None:
        builder.decimals(decimals)
    return builder


def status(title: str, description: str, *queries: Dataquery, down: str, up: str) -> stat.Panel:
    """A tile per series of a 0/1 gauge: 0 in red, called ``down``; 1 in green, called ``up``."""
    words = {
        "0": model.ValueMappingResult(text=down, color="red", index=0),
        "1": model.ValueMappingResult(text=up, color="green", index=1),
    }
    return (
        count(title, description, *queries)
        .thresholds(steps("red", (1, "green")))
        .mappings([model.ValueMap(options=words)])
    )


def count(title: str, description: str, *queries: Dataquery) -> stat.Panel:
    """A tile per series, green at 0 and orange from 1 on."""
    return (
        panel(stat.Panel(), title, description, *queries, width=6, height=7)
        .color_scheme(BY_THRESHOLDS)
        .thresholds(steps("green", (1, "orange")))
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(LAST_VALUE)
    )


def steps(base: str, *above: tuple[float, str]) -> ThresholdsConfig:
    """Absolute thresholds: ``base`` colour, then each (value, colour) from that value up."""
    return (
        ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps(
            [model.Threshold(value=None, color=base)]
            + [model.Threshold(value=value, color=colour) for value, colour in above]
        )
    )


def setting(name: str, value: object) -> model.DynamicConfigValue:
    return model.DynamicConfigValue(id_val=name, value=value)


def fixed_colour(colour: str) -> model.DynamicConfigValue:
    return setting("color", {"mode": "fixed", "fixedColor": colour})


BY_THRESHOLDS = FieldColor().mode(model.FieldColorModeId.THRESHOLDS)
LAST_VALUE = ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields("")
DASHED = setting("custom.lineStyle", {"fill": "dash", "dash": [10, 10]})
#: A limit drawn behind the values it bounds: dashed, thin, not filled.
LIMIT_LINE = [DASHED, setting("custom.fillOpacity", 0), setting("custom.lineWidth", 1)]
#: What the values would be unconstrained: dotted, thin, not filled.
DOTTED_LINE = [
    setting("custom.lineStyle", {"fill": "dot", "dash": [0, 10]}),
    setting("custom.fillOpacity", 0),
    setting("custom.lineWidth", 1),
]


# ------------------------------------------------------------------------------------ output


def render() -> str:
    """The dashboard as the JSON text Grafana provisions."""
    built = dashboard().build()
    # Grafana refers to panels by id (links, "view panel"): number them top to bottom.
    for number, item in enumerate(built.panels or [], start=1):
        item.id_val = number
    return json.dumps(built, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.dashboard",
        description="Build the Grafana dashboard and write it where Grafana provisions it from.",
    )
    parser.add_argument(
        "--output", type=Path, default=OUTPUT, help=f"where to write it (default: {OUTPUT})"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the file differs from what this module builds",
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
