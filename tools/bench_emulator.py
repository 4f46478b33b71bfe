"""Measure the tracking API emulator: requests/s for single calls, events/s for visitorEvents batches.

The emulator runs as ``rr-consumer emulator`` in its own process on loopback, as in the local stack; the load
generator is ``wrk`` when it is installed (a C client, so the emulator is what is measured) and otherwise an
aiohttp client in a separate process. Every figure is checked against the emulator's own counters: only
requests it answered 200 count.

    python -m tools.bench_emulator                      # 10 s each, 64 connections, batches of 500
    python -m tools.bench_emulator --duration 5 --generator aiohttp --record

Bounded on purpose: loopback only, at most 120 s per run and 1,024 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PARTNER, KEY = "bench", "bench-key"
EVENT = {
    "sessionExternalId": "60842392e4881c65e6c5e423",
    "productId": 123456,
    "stockId": "NewYork",
    "timestamp": "2018-09-15T15:53:00+00:00",
}
MAX_DURATION = 120.0
MAX_CONNECTIONS = 1024


@dataclass(frozen=True)
class Result:
    mode: str
    generator: str
    connections: int
    seconds: float
    accepted: int  # requests the emulator answered 200, per its counters
    other: int  # requests it answered otherwise
    events: int  # events it accepted, per its counters
    batch_size: int
    p50_ms: float | None
    p99_ms: float | None

    @property
    def requests_per_s(self) -> float:
        return self.accepted / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


# --- the emulator under test -------------------------------------------------------------------------


@contextmanager
def emulator(record: bool) -> Iterator[str]:
    """Start ``rr-consumer emulator`` on a free loopback port; yield its base URL; stop it with SIGTERM."""
    command = [sys.executable, "-m", "consumer", "emulator", "--host", HOST, "--port", "0"]
    command += ["--shop", f"{PARTNER}:{KEY}"] + ([] if record else ["--max-events", "0"])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        match = re.search(r"listening on (\S+)", banner)
        if match is None:
            raise RuntimeError(f"emulator did not start: {banner!r}")
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin(base_url: str, path: str, method: str = "GET") -> dict[str, Any]:
    admin_url = base_url.removesuffix("1.0/") + "_emulator/" + path
    with urllib.request.urlopen(urllib.request.Request(admin_url, method=method), timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def body_for(mode: str, batch_size: int) -> tuple[str, bytes]:
    """The method and the JSON body each request of ``mode`` sends."""
    if mode == "single":
        return "view", json.dumps(EVENT, separators=(",", ":")).encode()
    batch = [{"view": {**EVENT, "productId": i}} for i in range(batch_size)]
    return "visitorEvents", json.dumps(batch, separators=(",", ":")).encode()


# --- load generators ---------------------------------------------------------------------------------


def run_wrk(url: str, body: bytes, connections: int, seconds: float) -> tuple[float | None, float | None]:
    """One wrk run (one thread: the other core is the emulator's); returns p50 and p99 latency in ms."""
    text = body.decode()
    level = "=" * next(n for n in range(1, 100) if f"]{'=' * n}]" not in text)
    script = (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [{level}[{text}]{level}]\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    try:
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", file.name, url]
        output = subprocess.run(
            command, capture_output=True, text=True, check=True, timeout=seconds + 60
        ).stdout
    finally:
        Path(file.name).unlink()
    return _wrk_percentile(output, "50%"), _wrk_percentile(output, "99%")


def _wrk_percentile(output: str, label: str) -> float | None:
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    if match is None:
        return None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
    return float(match.group(1)) * scale


def run_aiohttp(url: str, body: bytes, connections: int, seconds: float) -> tuple[float | None, float | None]:
    """An aiohttp client with ``connections`` concurrent workers, in its own process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        latencies: list[float] = pool.apply(_aiohttp_load, (url, body, connections, seconds))
    latencies.sort()
    if not latencies:
        return None, None
    return latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000


def _aiohttp_load(url: str, body: bytes, connections: int, seconds: float) -> list[float]:
    return asyncio.run(_aiohttp_workers(url, body, connections, seconds))


async def _aiohttp_workers(url: str, body: bytes, connections: int, seconds: float) -> list[float]:
    import aiohttp

    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections)

    async def worker(session: aiohttp.ClientSession) -> None:
        while (started := time.monotonic()) < deadline:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
            latencies.append(time.monotonic() - started)

    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return latencies


# --- one measurement ---------------------------------------------------------------------------------


def measure(
    base_url: str, mode: str, generator: str, connections: int, seconds: float, batch_size: int
) -> Result:
    method, body = body_for(mode, batch_size)
    url = f"{base_url}{method}?partnerId={PARTNER}&apiKey={KEY}"
    load = run_wrk if generator == "wrk" else run_aiohttp
    load(url, body, connections, min(2.0, seconds))  # warm-up: connections, caches, the parser
    admin(base_url, "reset", "POST")
    started = time.monotonic()
    p50, p99 = load(url, body, connections, seconds)
    elapsed = time.monotonic() - started
    counters = admin(base_url, "counters")
    statuses: dict[str, int] = counters["requests"].get(method, {})
    accepted = statuses.get("200", 0)
    return Result(
        mode=mode,
        generator=generator,
        connections=connections,
        # wrk runs for exactly the duration asked; our own clock also covers starting the process.
        seconds=seconds if generator == "wrk" else elapsed,
        accepted=accepted,
        other=sum(statuses.values()) - accepted,
        events=counters["events_accepted"],
        batch_size=1 if mode == "single" else batch_size,
        p50_ms=p50,
        p99_ms=p99,
    )


def report(result: Result) -> str:
    latency = (
        f", p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
        if result.p50_ms is not None and result.p99_ms is not None
        else ""
    )
    return (
        f"{result.mode:>6}: {result.requests_per_s:>9,.0f} requests/s  {result.events_per_s:>11,.0f} events/s"
        f"  (batch size {result.batch_size}, {result.connections} connections, {result.generator},"
        f" {result.seconds:.1f} s, {result.accepted:,} answered 200, {result.other:,} otherwise{latency})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=64, help="for single calls")
    parser.add_argument("--batch-connections", type=int, default=16, help="for batches")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--generator", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--record", action="store_true", help="keep every event (default: count only)")
    parser.add_argument("--mode", choices=("single", "batch", "both"), default="both")
    parser.add_argument("--json", action="store_true", help="print results as JSON lines too")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}]")
    if not (0 < args.connections <= MAX_CONNECTIONS and 0 < args.batch_connections <= MAX_CONNECTIONS):
        parser.error(f"connections must be in 1..{MAX_CONNECTIONS}")
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "aiohttp"
    modes = ("single", "batch") if args.mode == "both" else (args.mode,)
    with emulator(args.record) as base_url:
        for mode in modes:
            connections = args.connections if mode == "single" else args.batch_connections
            result = measure(base_url, mode, generator, connections, args.duration, args.batch_size)
            print(report(result), flush=True)
            if args.json:
                print(json.dumps({**result.__dict__, "requests_per_s": result.requests_per_s}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
