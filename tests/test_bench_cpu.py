"""bench.cpu's reading of wrk: only 2xx answers are accepted requests, each for an EV of its own."""

from __future__ import annotations

import re

from bench.cpu import WRK_SCRIPT, wrk_accepted
from smartgrid.contract import is_valid_ev_id

WRK_OUTPUT = """Running 15s test @ http://127.0.0.1:8200/charge
  1 threads and 64 connections
  12105 requests in 15.10s, 3.01MB read
  Non-2xx or 3xx responses: 105
Requests/sec:    801.66
"""


def test_answers_other_than_2xx_are_not_counted_as_accepted():
    assert wrk_accepted(WRK_OUTPUT) == 12_000
    assert wrk_accepted(WRK_OUTPUT.replace("  Non-2xx or 3xx responses: 105\n", "")) == 12_105


def test_each_request_of_the_script_names_an_ev_of_its_own_that_the_contract_accepts():
    script = WRK_SCRIPT.format(prefix="Wab12cd34")
    assert 'local prefix = "Wab12cd34-"' in script
    assert re.search(r"sent = sent \+ 1", script)
    assert "EV1234" not in script
    assert is_valid_ev_id("Wab12cd34-" + "9" * 9)  # the prefix, the request's number
