"""Raw PIT paging against a server, for the cross-index sort tests."""

from __future__ import annotations

from typing import Any

import requests


def raw_pit_paging(url: str, sort: list[Any], size: int, *, dialect: str, pattern: str = "logs-twin-*"
                   ) -> list[str]:
    """Page a PIT with ``search_after`` exactly as a client would (the old meshlens sort, or any)."""
    if dialect == "es":
        pit = requests.post(f"{url}/{pattern}/_pit?keep_alive=1m", timeout=10).json()["id"]
    else:
        pit = requests.post(f"{url}/{pattern}/_search/point_in_time?keep_alive=1m", timeout=10).json()["pit_id"]
    body: dict[str, Any] = {"size": size, "sort": sort, "pit": {"id": pit, "keep_alive": "1m"}}
    seen: list[str] = []
    while True:
        hits = requests.post(f"{url}/_search", json=body, timeout=10).json()["hits"]["hits"]
        if not hits:
            return seen
        seen += [f"{h['_index']}/{h['_id']}" for h in hits]
        body["search_after"] = hits[-1]["sort"]
