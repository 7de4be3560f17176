"""The Grafana dashboard is code (monitoring/dashboard.py); the JSON Grafana reads is its output.

The committed JSON must be exactly what the generator builds now, so that nobody edits the JSON
by hand and a change to the code is never left unapplied. What the dashboard's queries mean is
checked in tests/test_monitoring.py, statically and against a real Prometheus.
"""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from monitoring.dashboard import LOAD_IMBALANCE_ABOVE, OUTPUT, QUEUES, REGENERATE, render
from smartgrid import contract

ROOT = Path(__file__).resolve().parent.parent


def _generator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monitoring.dashboard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_committed_dashboard_is_what_the_generator_builds():
    committed, built = OUTPUT.read_text(), render()
    if committed != built:
        diff = difflib.unified_diff(
            committed.splitlines(), built.splitlines(), "committed", "generated", lineterm=""
        )
        pytest.fail(
            f"{OUTPUT.relative_to(ROOT)} is not what monitoring/dashboard.py builds: run"
            f" `{REGENERATE}` (python -m monitoring.dashboard) and commit the result.\n"
            + "\n".join(list(diff)[:60])
        )


def test_the_command_writes_the_file_and_check_tells_when_it_is_stale(tmp_path: Path):
    written = tmp_path / "smartgrid.json"
    result = _generator("--output", str(written))
    assert result.returncode == 0, result.stderr
    assert written.read_text() == render()
    assert _generator("--check", "--output", str(written)).returncode == 0

    written.write_text(written.read_text().replace('"Load per substation"', '"Edited by hand"'))
    stale = _generator("--check", "--output", str(written))
    assert stale.returncode == 1
    assert REGENERATE in stale.stderr and str(written) in stale.stderr
    assert "Edited by hand" in written.read_text(), "--check must not write"


def test_the_command_has_help():
    result = _generator("--help")
    assert result.returncode == 0
    assert "--check" in result.stdout and "--output" in result.stdout


def test_every_panel_sits_under_its_row_and_rows_are_full_width():
    panels = json.loads(render())["panels"]
    rows = [panel for panel in panels if panel["type"] == "row"]
    assert len(rows) > 1
    assert all(
        row["gridPos"] == {"x": 0, "y": row["gridPos"]["y"], "w": 24, "h": 1} for row in rows
    )
    assert panels[0]["type"] == "row", "the first thing on the dashboard is a row header"
    row_y = None
    bottom = 0  # the lowest edge of the panels so far
    for panel in panels:
        pos = panel["gridPos"]
        if panel["type"] == "row":
            assert pos["y"] == bottom, f"row {panel['title']!r} is not right below the panels above"
            row_y, bottom = pos["y"], pos["y"] + 1
            continue
        assert pos["y"] > row_y, f"{panel['title']} is above its row"
        bottom = max(bottom, pos["y"] + pos["h"])
    assert [panel["id"] for panel in panels] == list(range(1, len(panels) + 1))


def test_the_queue_panels_show_smartgrids_own_queues_and_no_others():
    # Prometheus anchors a regular expression at both ends, as fullmatch does.
    ours = [
        contract.PENDING_QUEUE,
        contract.DEAD_LETTER_QUEUE,
        contract.substation_queue_name("substation-1"),
        contract.substation_queue_name("substation_2"),
    ]
    others = ["smartgrid.substation-events", "smartgrid.pendingX", "smartgridXpending", "other"]
    assert [name for name in ours + others if re.fullmatch(QUEUES, name)] == ours


def test_the_load_spread_turns_red_where_the_alert_fires():
    rules = yaml.safe_load((ROOT / "monitoring/prometheus/rules/smartgrid.yml").read_text())
    (alert,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "LoadImbalance"]
    assert alert["expr"] == f"smartgrid:load_spread > {LOAD_IMBALANCE_ABOVE}"


def test_the_panels_read_the_contracts_metric_names_for_the_chosen_substations():
    exprs = " ".join(
        target["expr"]
        for panel in json.loads(render())["panels"]
        for target in panel.get("targets", [])
    )
    for name in (contract.LOAD_METRIC, contract.CAPACITY_METRIC, contract.INFO_METRIC):
        assert f'{name}{{substation=~"$substation"}}' in exprs, name
