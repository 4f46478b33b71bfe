"""A real single-node Apache Kafka broker (KRaft) for tests and local runs, without Docker.

The broker is assembled from Apache Kafka's own jars on Maven Central (fetched once with Maven into a cache
outside git), started on 127.0.0.1 on free ports with a fresh data directory, and stopped with SIGTERM (then
SIGKILL after a grace period), leaving no process behind.

Command line (``python -m tools.kafka_local``)::

    up          start a broker in the background, print its address, remember it in .kafka/state.json
    down        stop the broker that ``up`` started
    bootstrap   print the bootstrap address of the running broker
    run -- CMD  start a broker, run CMD with KAFKA_BOOTSTRAP_SERVERS set, stop the broker,
                exit with CMD's status
    fetch       only fetch the jars into the cache

When ``KAFKA_BOOTSTRAP_SERVERS`` is already set, ``up``/``run`` start nothing and use that cluster.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.7.1:copy-dependencies"
START_DEADLINE_S = 90.0
#: Partitions of ``__consumer_offsets``: 50 (the default) slow the first group join for nothing on one node.
OFFSETS_PARTITIONS = 6
#: The poll interval of the deadline-bounded wait for a starting broker.
READY_POLL_S = 0.1
STOP_GRACE_S = 15.0
ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".kafka"
STATE_FILE = STATE_DIR / "state.json"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.rr-consumer</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version>
    </dependency>
    <!-- the release tarball ships a logging binding; the published POM does not -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why."""


def cache_dir() -> Path:
    """Where the jars live: outside git, shared by every clone on the machine."""
    base = os.environ.get("RR_KAFKA_CACHE") or Path.home() / ".cache" / "rr-consumer"
    return Path(base) / f"kafka-{KAFKA_VERSION}"


def fetch_jars() -> Path:
    """Fetch the broker's jars once (Maven resolves the whole runtime classpath); return the libs folder."""
    target = cache_dir()
    libs = target / "libs"
    done = target / ".complete"
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs fetching at once must not interleave
        if done.exists():
            return libs
        if shutil.which("mvn") is None:
            raise BrokerError("Maven (mvn) is not on PATH: it is needed once to fetch the Kafka jars")
        (target / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
        shutil.rmtree(libs, ignore_errors=True)
        command = [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(target / "pom.xml"),
            DEPENDENCY_PLUGIN,
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerError(
                f"fetching Kafka {KAFKA_VERSION} jars failed:\n{_tail(result.stdout + result.stderr)}"
            )
        # Kafka 4 logs through slf4j 2; keep one binding so the broker log is written.
        for extra in libs.glob("log4j-slf4j2-impl-*.jar"):
            extra.unlink()
        done.write_text(KAFKA_VERSION)
    return libs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_id() -> str:
    """Kafka's cluster id: 16 random bytes, URL-safe base64 without padding (what `random-uuid` prints).

    Like Kafka's own ``Uuid.randomUuid``, never one that starts with ``-``: the storage tool's argument
    parser would take it for an option (one start in 64 failed that way).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Broker:
    """A running (or stopped) local broker."""

    bootstrap: str
    pid: int
    data_dir: Path
    # Kept when this process started the broker, so it is reaped (and Python does not warn it was leaked).
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name in ("broker.log", "stdout.log"):
            path = self.data_dir / name
            if path.exists():
                parts.append(
                    f"--- {name} (last {lines} lines) ---\n" + _tail(path.read_text(errors="replace"), lines)
                )
        return "\n".join(parts) or "(the broker wrote no log)"

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        # A zombie (exited, not yet reaped) still answers kill(0); read its state to tell.
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return False
        return True


def _write_config(data_dir: Path, port: int, controller_port: int) -> Path:
    properties = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data_dir / "logs"),
        "num.partitions": "1",
        # Topics are created on purpose (by tests, by `make run`); a typo must not create one silently.
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": str(OFFSETS_PARTITIONS),
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
    }
    path = data_dir / "server.properties"
    path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    (data_dir / "log4j2.properties").write_text(_LOG4J2.format(log=data_dir / "broker.log"))
    return path


def _java() -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise BrokerError("java is not on PATH: the local broker needs Java 17 or newer")
    return [java, "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true"]


def start(data_root: Path | None = None, deadline_s: float = START_DEADLINE_S) -> Broker:
    """Start a fresh broker and return once it answers metadata and group requests."""
    libs = fetch_jars()
    data_dir = Path(tempfile.mkdtemp(prefix="rr-kafka-", dir=data_root))
    port, controller_port = free_port(), free_port()
    config = _write_config(data_dir, port, controller_port)
    classpath = f"{libs}/*"
    fmt = subprocess.run(
        [
            *_java(),
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _cluster_id(),
            "-c",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if fmt.returncode != 0:
        raise BrokerError(f"formatting the broker's storage failed:\n{_tail(fmt.stdout + fmt.stderr)}")
    return _launch(data_dir, f"127.0.0.1:{port}", deadline_s)


def restart(broker: Broker, deadline_s: float = START_DEADLINE_S) -> Broker:
    """Start a broker that was killed (see :func:`kill`) again, on its data directory and ports."""
    if broker.alive():
        raise BrokerError(f"the broker at {broker.bootstrap} is still running")
    return _launch(broker.data_dir, broker.bootstrap, deadline_s)


def kill(broker: Broker) -> None:
    """kill -9 the broker and reap it, keeping its data directory (for :func:`restart`)."""
    _signal(broker, signal.SIGKILL)
    if not _wait_exit(broker, STOP_GRACE_S):
        raise BrokerError(f"the broker at {broker.bootstrap} survived SIGKILL")


def freeze(broker: Broker) -> None:
    """SIGSTOP the broker: its sockets stay open, and nothing answers (:func:`thaw` lets it go on)."""
    _signal(broker, signal.SIGSTOP)


def thaw(broker: Broker) -> None:
    _signal(broker, signal.SIGCONT)


def _launch(data_dir: Path, bootstrap: str, deadline_s: float) -> Broker:
    """Run the broker of a formatted data directory and return once it is ready."""
    libs = fetch_jars()
    config = data_dir / "server.properties"
    classpath = f"{libs}/*"
    with open(data_dir / "stdout.log", "ab") as out:
        process = subprocess.Popen(
            [
                *_java(),
                f"-Dlog4j2.configurationFile={data_dir / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={data_dir}",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() signals the JVM, not our shell
        )
    broker = Broker(bootstrap=bootstrap, pid=process.pid, data_dir=data_dir, process=process)
    try:
        _wait_ready(broker, process, deadline_s)
    except BaseException:
        stop(broker)
        raise
    return broker


def _wait_ready(broker: Broker, process: subprocess.Popen[bytes], deadline_s: float) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # Quiet (log_level 0: no line at all while the broker starts), and with no Python callback: a client
    # that calls into Python from librdkafka's threads is what a destroy can end up waiting on.
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 0})
    deadline = time.monotonic() + deadline_s
    last_error = "no answer yet"
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BrokerError(
                    f"the broker exited with status {process.returncode} before it was ready\n"
                    f"{broker.log_tail()}"
                )
            try:
                metadata = admin.list_topics(timeout=2)
                if metadata.brokers and _groups_ready(admin):
                    return
                last_error = "group coordinators still loading"
            except KafkaException as error:
                last_error = str(error)
            time.sleep(READY_POLL_S)
    finally:
        # Destroyed here, while the broker runs (or has just died): a traceback of the failure keeps this
        # frame, and with it a client whose destroy in some later garbage collection hung the test suite.
        del admin
    raise BrokerError(
        f"the broker at {broker.bootstrap} did not answer metadata and group requests within "
        f"{deadline_s:.0f}s ({last_error})\n{broker.log_tail()}"
    )


def _groups_ready(admin: AdminClient) -> bool:
    """Whether every partition of ``__consumer_offsets`` has a loaded group coordinator.

    Metadata answers before the offsets topic exists; the first group request creates it, and until each
    partition's coordinator has loaded, committing a group's offsets fails (COORDINATOR_LOAD_IN_PROGRESS):
    the first test to touch a group after start-up failed that way now and then. One group per partition
    is described (not asked for its offsets: librdkafka 2.16 can crash on an offset fetch for an unseen
    group while the coordinator moves, confluent-kafka-python#1982).
    """
    from confluent_kafka import KafkaException

    futures = admin.describe_consumer_groups(list(_READINESS_GROUPS), request_timeout=2)
    for future in futures.values():
        # exception(), not result(): a raised error's traceback would hold this frame, the frame the futures
        # and so the error: a reference cycle keeping ``admin`` alive until some garbage collection.
        error = future.exception(timeout=5)
        if isinstance(error, KafkaException):
            return False  # NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS: not yet
        if error is not None:
            raise error
    return True


def _offsets_partition(group: str, partitions: int) -> int:
    """The ``__consumer_offsets`` partition of a group: Kafka's ``abs(group.hashCode()) % partitions``."""
    code = 0
    for char in group:
        code = (31 * code + ord(char)) & 0xFFFFFFFF  # Java's String.hashCode, as 32-bit two's complement
    signed = code - (1 << 32) if code >= 1 << 31 else code
    return (0 if signed == -(1 << 31) else abs(signed)) % partitions


def _readiness_groups(partitions: int) -> tuple[str, ...]:
    """One group name per ``__consumer_offsets`` partition."""
    chosen: dict[int, str] = {}
    for n in itertools.count():
        name = f"rr-local-ready-{n}"
        chosen.setdefault(_offsets_partition(name, partitions), name)
        if len(chosen) == partitions:
            return tuple(chosen[p] for p in range(partitions))
    raise AssertionError("unreachable")


_READINESS_GROUPS = _readiness_groups(OFFSETS_PARTITIONS)


def stop(broker: Broker, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the broker, SIGKILL it after ``grace_s``, reap it, and remove its data directory."""
    _signal(broker, signal.SIGTERM)
    if not _wait_exit(broker, grace_s):
        _signal(broker, signal.SIGKILL)
        _wait_exit(broker, grace_s)
    shutil.rmtree(broker.data_dir, ignore_errors=True)


def _signal(broker: Broker, signum: int) -> None:
    # The broker runs in its own process group; signal the group so nothing it spawned survives it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(broker.pid, signum)


def _wait_exit(broker: Broker, timeout_s: float) -> bool:
    """Wait for the broker to exit; True when it has. Reaps it when this process is its parent."""
    if broker.process is not None:
        try:
            broker.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout_s
    while broker.alive():  # started by another process (`up`): we can only watch the process table
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def running() -> Iterator[str]:
    """The bootstrap address of a broker for the duration of the block: the configured one, or a fresh one."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    broker = start()
    try:
        yield broker.bootstrap
    finally:
        stop(broker)


# --- command line -------------------------------------------------------------------------------------


def _cmd_up() -> int:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        print(os.environ["KAFKA_BOOTSTRAP_SERVERS"])
        return 0
    state = _read_state()
    if state is not None and state.alive():
        print(state.bootstrap)
        return 0
    STATE_DIR.mkdir(exist_ok=True)
    broker = start(data_root=STATE_DIR)
    STATE_FILE.write_text(
        json.dumps({"bootstrap": broker.bootstrap, "pid": broker.pid, "data_dir": str(broker.data_dir)})
    )
    print(broker.bootstrap)
    return 0


def _cmd_down() -> int:
    state = _read_state()
    if state is not None:
        stop(state)
        STATE_FILE.unlink(missing_ok=True)
    return 0


def _cmd_bootstrap() -> int:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        print(os.environ["KAFKA_BOOTSTRAP_SERVERS"])
        return 0
    state = _read_state()
    if state is None or not state.alive():
        print("no local broker is running: make kafka-up", file=sys.stderr)
        return 1
    print(state.bootstrap)
    return 0


def _cmd_run(command: Sequence[str]) -> int:
    if not command:
        print("run: give the command to run after --", file=sys.stderr)
        return 2
    with running() as bootstrap:
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}
        child = subprocess.Popen(list(command), env=env)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            return child.wait()


def _read_state() -> Broker | None:
    if not STATE_FILE.exists():
        return None
    raw = json.loads(STATE_FILE.read_text())
    return Broker(bootstrap=raw["bootstrap"], pid=int(raw["pid"]), data_dir=Path(raw["data_dir"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.kafka_local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down", "bootstrap", "run", "fetch"])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="with run: the command (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.action == "fetch":
            print(fetch_jars())
            return 0
        if args.action == "run":
            return _cmd_run(command)
        return {"up": _cmd_up, "down": _cmd_down, "bootstrap": _cmd_bootstrap}[args.action]()
    except BrokerError as error:
        print(f"kafka_local: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
