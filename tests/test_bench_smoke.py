"""The benchmark's smoke version: ``python -m tools.bench --quick`` runs every figure's code on a tiny
workload against the test broker and writes a report with a row for each figure.

Only that the report is produced and complete is checked, never a speed: these machines are too noisy for
a speed assertion in the test suite, and the full benchmark (``make bench``) is where speed is judged.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from confluent_kafka.admin import AdminClient

from tools.bench.figures import FIGURES

ROOT = Path(__file__).resolve().parent.parent
#: The smoke run takes about 50 s on a loaded 2-core machine; this only stops a hung run hanging the suite.
DEADLINE_S = 180

#: The figure column of each target's row, as the report writes it.
ROW_TITLES = {
    "batch": "events/s end to end, `batch` mode, one process",
    "single": "events/s end to end, `single` mode, one process, rate limit off",
    "cpu": "CPU time per event (process CPU / events)",
    "latency": "`single` mode with 20 ms emulated latency",
    "ratelimit": "rate limit 50 requests/s per shop, 2 shops",
    "backlog_ratelimit": "a backlog under the rate limit: 2 shops, 50 requests/s each, 500 events per batch",
    "latency_e2e": "end-to-end latency at a steady 2,000 events/s",
    "memory": "resident memory while draining",
    "naive": "a naive consumer (poll, one blocking POST, commit, per record)",
    "arroyo": "an arroyo pipeline",
}


def run_bench(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m tools.bench ARGS`` in a session of its own: a hung run is ended with all its children."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    command = [sys.executable, "-m", "tools.bench", *args]
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise AssertionError(f"the quick benchmark took over {DEADLINE_S}s:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_the_quick_benchmark_writes_a_report_with_every_figure(kafka_bootstrap: str, tmp_path: Path) -> None:
    output = tmp_path / "x.md"
    done = run_bench(kafka_bootstrap, "--quick", "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert output.exists()
    report = output.read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert set(ROW_TITLES) == set(FIGURES), "a figure was added: give it a row title here"
    for key, title in ROW_TITLES.items():
        assert any(line.startswith(f"| {title}") for line in table), f"no row for the {key} figure"
    for heading in ("## Machine", "## Workload", "## Where the time goes"):
        assert heading in report
    assert "| librdkafka |" in report
    assert "| python |" in report


def test_the_quick_benchmark_deletes_the_topic_it_created(
    kafka_bootstrap: str, kafka_admin: AdminClient, tmp_path: Path
) -> None:
    """The backlog topic a run creates is gone when it ends: runs share the broker."""
    done = run_bench(kafka_bootstrap, "--quick", "--only", "cpu", "--output", str(tmp_path / "y.md"))
    assert done.returncode == 0, done.stderr[-3000:]
    created = re.search(r"events to (bench-backlog-\w+)", done.stderr)
    assert created is not None, done.stderr[-3000:]
    topics = kafka_admin.list_topics(timeout=10).topics
    assert created.group(1) not in topics
