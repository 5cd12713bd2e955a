"""Test helpers around tests.local_server."""

from __future__ import annotations

import json
from typing import Any

from tests.local_server import BIN, HOST, free_port, http, running

__all__ = ["BIN", "HOST", "free_port", "http", "http_json", "running"]


def http_json(url: str, payload: Any = None) -> Any:
    status, body = http(url, payload)
    assert status == 200, f"{url}: HTTP {status}: {body[:500]!r}"
    return json.loads(body)
