"""`make run`: the README's main command brings up a working stack and stops cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_local_stack_delivers_generated_traffic_and_stops_cleanly(
    kafka_bootstrap: str, schema_registry_url: str
) -> None:
    # The session's broker and registry: the stack uses what the environment names, as `make run` would.
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "SCHEMA_REGISTRY_URL": schema_registry_url,
    }
    result = subprocess.run(
        [sys.executable, "-m", "tools.local_stack", "--until-delivered", "500", "--rate", "1000"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "relay exited with status 0" in output
    assert '"relay.stopped"' in output, "the relay drained and stopped on SIGTERM"
    assert "delivered to the emulator" in output
    assert f"schema registry at {schema_registry_url}" in output
    # The demo key is a secret like any other: it appears nowhere in what the stack printed.
    assert "local-demo-key" not in output
