"""Each contender as a child process, all configured by the same relay TOML file.

The relay runs as ``rr-consumer run`` (what users run); the references and comparisons are the small
programs of this package (``python -m tools.bench.ceiling`` and so on). Every one of them reads the relay's
configuration file, so they consume the same topic with the same decoders (``consumer.service
.build_decoders``), the same translation and the same shops and URLs: only what is being compared differs.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.bench.measure import Probe
from tools.bench.stack import ROOT, BenchError, child_env, stop_process
from tools.bench.workload import Workload

#: Settings the benchmark changes from the relay's defaults, and why.
BENCH_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    # A measured run is stopped once its window closes; what is still in flight then does not matter, and
    # the default 20 s drain would only make the run longer (the rate-limit figure holds thousands).
    "delivery": {"shutdown_grace_s": 1.0},
    "observability": {"log_format": "json", "log_level": "info"},
}


def toml_value(value: Any) -> str:
    """One TOML value (the few types a relay configuration holds)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_relay_config(
    path: Path,
    *,
    bootstrap: str,
    workload: Workload,
    group: str,
    emulator_url: str,
    mode: str,
    rate_limit: float | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """The relay's TOML configuration for one run. ``rate_limit=None`` turns the relay's limiter off."""
    sections: dict[str, dict[str, Any]] = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group},
        "schema_registry": {"url": workload.registry_url},
        "tracking": {"base_url": emulator_url},
        "delivery": {"mode": mode},
    }
    for source in (BENCH_DEFAULTS, overrides or {}):
        for name, values in source.items():
            sections.setdefault(name, {}).update(values)
    lines = [f'[[topics]]\nname = {toml_value(workload.topic)}\nformat = "confluent-avro"\n']
    for shop in workload.shops:
        limit = math.inf if rate_limit is None else rate_limit
        lines.append(
            f"[shops.{shop.key}]\npartner_id = {toml_value(shop.partner_id)}\n"
            f"api_key_env = {toml_value(shop.key_env)}\nrate_limit = {toml_value(limit)}\n"
        )
    for name, values in sections.items():
        body = "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())
        lines.append(f"[{name}]\n{body}")
    path.write_text("\n".join(lines))
    return path


def shop_keys_env(workload: Workload) -> dict[str, str]:
    """The shops' ``apiKey`` environment variables, as the relay's configuration names them."""
    return {shop.key_env: shop.api_key for shop in workload.shops}


@dataclass
class Child:
    """A contender's process, its log, and a probe of its CPU time and memory."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    probe: Probe = field(init=False)

    def __post_init__(self) -> None:
        self.probe = Probe(self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def problem(self) -> str | None:
        """``None`` while it runs; else how it ended, with the end of its log."""
        status = self.process.poll()
        if status is None:
            return None
        return f"{self.name} exited with status {status}; the end of {self.log_path}:\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        return stop_process(self.process)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"{self.name} did not finish within {timeout_s:.0f}s") from None

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.stop()


def start_child(name: str, command: Sequence[str], log_path: Path, env: Mapping[str, str]) -> Child:
    """Start ``command`` with its output (stdout and stderr) in ``log_path``."""
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, env=dict(env), cwd=ROOT
        )
    return Child(name, process, log_path)


def start_relay(config: Path, workload: Workload, log_path: Path) -> Child:
    """``rr-consumer run`` with ``config``."""
    command = [sys.executable, "-m", "consumer", "run", "--config", str(config)]
    return start_child("the relay", command, log_path, child_env(**shop_keys_env(workload)))


def start_program(
    name: str, module: str, config: Path, workload: Workload, log_path: Path, *args: str
) -> Child:
    """One of this package's child programs (``tools.bench.<module>``) with the relay's ``config``."""
    command = [sys.executable, "-m", f"tools.bench.{module}", "--config", str(config), *args]
    return start_child(name, command, log_path, child_env(**shop_keys_env(workload)))
