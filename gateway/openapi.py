"""The OpenAPI 3.1 description of the gateway's HTTP API (``gateway/openapi.json``), which the
gateway serves at ``/openapi.json``. The JSON file is the source; tests hold the code to it."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def description() -> dict:
    return json.loads(resources.files("gateway").joinpath("openapi.json").read_text("utf-8"))
