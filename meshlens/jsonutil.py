"""JSON decoding shared by sources and containers: orjson where it agrees with the standard library.

Why a module of its own: the Loki/ES HTTP answers (sources) and the per-line envelopes of exported files
(containers, e.g. logcli's jsonl) are both decoded per record on the ingest's hot path, and neither layer
should import the other. orjson is 3-7x faster than ``json``; what it refuses but JSON allows (integers
beyond 64 bits such as an ES ``unsigned_long``, NaN/Infinity, lone surrogates) is decoded by the standard
library, which also gives the error -- so results and error messages are exactly the standard library's.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads_json(body: bytes | str) -> Any:
    """Decode a JSON document: orjson (fast), the standard library for what orjson refuses that JSON
    allows; ``json.JSONDecodeError`` (a ValueError) with the standard library's message when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)
