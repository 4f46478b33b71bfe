"""The probe server: its answers follow the checks it is given, from a thread of its own."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from consumer.health import HealthServer
from consumer.metrics import RelayMetrics


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_probes_answer_200_when_healthy_and_503_with_the_problems_when_not() -> None:
    problems: list[str] = []
    metrics = RelayMetrics()
    metrics.consumed["events"] += 3
    server = HealthServer(
        metrics,
        liveness=lambda: list(problems),
        readiness=lambda: [*problems, "not yet"],
        host="127.0.0.1",
        port=0,
    )
    port = server.start()
    try:
        assert fetch(port, "/healthz") == (200, json.dumps({"status": "ok", "problems": []}).replace(" ", ""))
        status, body = fetch(port, "/readyz")
        assert status == 503
        assert json.loads(body) == {"status": "failing", "problems": ["not yet"]}
        problems.append("the event loop has not ticked for 12s")
        status, body = fetch(port, "/healthz")
        assert status == 503
        assert json.loads(body)["problems"] == ["the event loop has not ticked for 12s"]
        status, text = fetch(port, "/metrics")
        assert status == 200
        assert 'rr_records_consumed_total{topic="events"} 3.0' in text
    finally:
        server.stop()
