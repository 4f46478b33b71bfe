"""What every figure runs against: the broker, the registry double, the emulator, topics, and the machine.

The emulator always runs as its own process (``rr-consumer emulator``): in the benchmark's own process it
would compete for the GIL with the measuring loop and with nothing else, which flatters no one and distorts
everything. It keeps no events (``--max-events 0``), only counters, so a million-event run costs it no
memory.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import confluent_kafka
import psutil
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tools import kafka_local

ROOT: Final = Path(__file__).resolve().parents[2]
HOST: Final = "127.0.0.1"
#: Every topic the benchmark creates starts with this, so a leftover one is easy to recognise.
TOPIC_PREFIX: Final = "bench-"
START_DEADLINE_S: Final = 30.0
STOP_GRACE_S: Final = 15.0


class BenchError(RuntimeError):
    """A benchmark step could not be carried out (a process died, a deadline passed); the message says why."""


@dataclass(frozen=True)
class Shop:
    """A shop of the workload: its key in the relay's configuration and its credentials at the emulator."""

    key: str
    partner_id: str
    api_key: str

    @property
    def key_env(self) -> str:
        """The environment variable the relay reads this shop's ``apiKey`` from."""
        return "BENCH_API_KEY_" + re.sub(r"\W", "_", self.key).upper()


#: Two shops, so that the rate-limit figure has two limits to keep at once.
SHOPS: Final = (
    Shop("shop-a", "p-bench-a", "k-bench-a-0001"),
    Shop("shop-b", "p-bench-b", "k-bench-b-0002"),
)


# --- the emulator -------------------------------------------------------------------------------------


class Emulator:
    """``rr-consumer emulator`` as a child process on a free loopback port, counting only unless told to keep
    events (``max_events``)."""

    def __init__(
        self,
        shops: Sequence[Shop],
        log_path: Path,
        *,
        rate_limit: float | None = None,
        max_events: int = 0,
    ) -> None:
        """``max_events``: how many accepted events it keeps, bodies and acceptance times (0: only counts)."""
        self.shops = tuple(shops)
        self.log_path = log_path
        self.rate_limit = rate_limit
        self.max_events = max_events
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self._admin: http.client.HTTPConnection | None = None

    def start(self) -> Emulator:
        command = [sys.executable, "-m", "consumer", "emulator", "--host", HOST, "--port", "0"]
        command += ["--max-events", str(self.max_events)]
        for shop in self.shops:
            command += ["--shop", f"{shop.partner_id}:{shop.api_key}"]
        if self.rate_limit is not None:
            command += ["--rate-limit", str(self.rate_limit)]
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=child_env()
        )
        assert self.process.stdout is not None
        banner = _read_line(self.process.stdout, START_DEADLINE_S)
        match = re.search(r"listening on (\S+)", banner)
        if match is None:
            self.stop()
            raise BenchError(f"the emulator did not start: {banner!r} (see {self.log_path})")
        self.url = match.group(1)
        # Whatever it prints later goes to its log, so a full pipe never blocks it.
        threading.Thread(
            target=_copy_lines, args=(self.process.stdout, log), name="emulator-stdout", daemon=True
        ).start()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def admin(self, path: str, method: str = "GET", body: object | None = None) -> Any:
        """Call the emulator's admin API over one kept-alive connection; return the JSON answer.

        The counters are read every few dozen milliseconds during a window: a new connection per reading
        would cost the measuring process (and so the machine) more than the reading is worth.
        """
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        for attempt in (1, 2):
            if self._admin is None:
                parts = urllib.parse.urlsplit(self.url)
                self._admin = http.client.HTTPConnection(parts.hostname or HOST, parts.port, timeout=30)
            try:
                self._admin.request(method, "/_emulator/" + path, body=data, headers=headers)
                response = self._admin.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException):
                self._admin.close()
                self._admin = None
                if attempt == 2:
                    raise
                continue
            if response.status != 200:
                raise BenchError(f"emulator admin {method} {path}: HTTP {response.status} {answer[:200]!r}")
            return json.loads(answer)
        raise AssertionError("unreachable")

    def accepted(self) -> int:
        """Events accepted so far (a single call is one event, a batch as many as it holds)."""
        return int(self.admin("counters")["events_accepted"])

    def counters(self) -> dict[str, Any]:
        return dict(self.admin("counters"))

    def reset(self) -> None:
        self.admin("reset", "POST")

    def set_faults(self, **faults: Any) -> None:
        """Replace the faults (none given: every fault off)."""
        self.admin("faults", "PUT", faults)

    def events(self, since: int) -> tuple[list[dict[str, Any]], int]:
        """The kept events from sequence number ``since`` on (with ``body`` and ``received_at``, the epoch
        seconds it accepted them at), and the ``since`` of the next poll."""
        answer = self.admin(f"events?since={since}")
        return list(answer["events"]), int(answer["next"])

    def requests(self) -> list[dict[str, Any]]:
        """The latest requests (up to 100,000) with their arrival time, shop and status."""
        return list(self.admin("requests")["requests"])

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _read_line(stream: Any, timeout_s: float) -> str:
    """The first line a child prints, or "" when it prints none within ``timeout_s``."""
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return found[0] if found else ""


def _copy_lines(stream: Any, out: Any) -> None:
    with contextlib.suppress(ValueError, OSError):  # the log was closed first: nothing left to keep
        for line in stream:
            out.write(line)
            out.flush()


# --- child processes ----------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no stray ``RR_*`` override, the repository importable, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def stop_process(process: subprocess.Popen[Any], grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``; return the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(grace_s)


# --- topics -------------------------------------------------------------------------------------------


@dataclass
class Topics:
    """Creates uniquely named ``bench-`` topics and deletes every one of them at the end."""

    admin: AdminClient
    created: list[str] = field(default_factory=list)

    def create(self, purpose: str, partitions: int) -> str:
        """A fresh topic and its dead-letter topic (the relay refuses to start without one)."""
        name = f"{TOPIC_PREFIX}{purpose}-{uuid.uuid4().hex[:8]}"
        futures = self.admin.create_topics(
            [
                NewTopic(name, num_partitions=partitions, replication_factor=1),
                NewTopic(f"{name}.dlq", num_partitions=1, replication_factor=1),
            ],
            operation_timeout=30,
        )
        for future in futures.values():
            future.result(timeout=30)
        self.created += [name, f"{name}.dlq"]
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._leaders_known(name, partitions):
            if time.monotonic() > deadline:
                raise BenchError(f"the partitions of {name} got no leader within {START_DEADLINE_S:.0f}s")
            time.sleep(0.1)  # the poll interval of a deadline-bounded wait
        return name

    def _leaders_known(self, name: str, partitions: int) -> bool:
        metadata = self.admin.list_topics(name, timeout=10).topics.get(name)
        return bool(
            metadata
            and len(metadata.partitions) == partitions
            and all(p.leader >= 0 for p in metadata.partitions.values())
        )

    def delete_all(self) -> None:
        if not self.created:
            return
        for future in self.admin.delete_topics(self.created, operation_timeout=30).values():
            # Already gone is as good as deleted. exception(), not result(): a raised error's traceback would
            # hold this frame, so the admin client, in a reference cycle until some garbage collection.
            error = future.exception(timeout=30)
            if error is not None and not isinstance(error, KafkaException):
                raise error
        self.created.clear()


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """The broker named by ``KAFKA_BOOTSTRAP_SERVERS``, or a fresh local one for the duration of the run."""
    with kafka_local.running() as bootstrap:
        yield bootstrap


# --- the machine --------------------------------------------------------------------------------------


def load_average() -> str:
    """The 1-minute load average: other work on the machine during a run shows here."""
    return f"{os.getloadavg()[0]:.2f}"


def revision() -> str:
    """The commit measured, ``+`` if ``consumer/`` had uncommitted changes (others may edit it meanwhile)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "consumer"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in consumer/" if dirty else "")


def machine(bootstrap: str, load_at_start: str, revision_at_start: str) -> dict[str, str]:
    """What the figures were measured on: they mean little without it."""
    memory = psutil.virtual_memory().total
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit (at start; at end)": f"{revision_at_start}; {revision()}",
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical ({psutil.cpu_count(logical=False)} physical)",
        "memory": f"{memory / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "librdkafka": confluent_kafka.libversion()[0],
        "confluent-kafka": importlib.metadata.version("confluent-kafka"),
        "kafka": kafka_version(bootstrap),
        "load average (1 min) at start, at end": f"{load_at_start}, {load_average()}",
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def kafka_version(bootstrap: str) -> str:
    """The broker's version, read from the classpath of the local JVM listening on the bootstrap port.

    Kafka's protocol does not tell a client the broker's release, and every broker this benchmark meets on
    these machines is a ``tools.kafka_local`` one, whose jars live in a folder named after the version.
    """
    port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
    for process in psutil.process_iter(["cmdline"]):
        command = process.info.get("cmdline") or []
        if "kafka.Kafka" not in command:
            continue
        with contextlib.suppress(psutil.Error):
            listening = {
                c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN
            }
            if port in listening:
                found = re.search(r"kafka-(\d+\.\d+\.\d+)", " ".join(command))
                return f"Apache Kafka {found.group(1)} (KRaft, one node)" if found else "Apache Kafka"
    return f"unknown (broker at {bootstrap})"
