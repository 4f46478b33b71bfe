"""A real Schema Registry for tests and local runs, without Docker: Apicurio Registry's Confluent API.

Apicurio Registry serves the Confluent Schema Registry REST API under ``/apis/ccompat/v7``, which is what
``confluent_kafka.schema_registry`` talks to. Its ready-built Quarkus application (a ``tar.gz`` on Maven
Central) is fetched once with Maven into a cache outside git, unpacked, and started with a Java 21 or newer
on 127.0.0.1 on free ports, with in-memory storage; it is stopped with SIGTERM (then SIGKILL after a grace
period), leaving no process behind.

Apicurio's own parent POM names repositories that cannot be reached from every machine, so the fetch uses a
generated Maven settings file whose one mirror sends every repository to Maven Central.

Two differences from Confluent's registry matter here and are settled at start: Apicurio's global
compatibility default is NONE, so it is set to BACKWARD (Confluent's default); ``/schemas/ids/{id}`` returns
compacted Avro text for schemas without references (the decoder parses it, so nothing depends on it).

Command line (``python -m tools.registry_local``)::

    up          start a registry in the background, print its URL, remember it in .registry/state.json
    down        stop the registry that ``up`` started
    url         print the URL of the running registry
    run -- CMD  start a registry, run CMD with SCHEMA_REGISTRY_URL set, stop the registry,
                exit with CMD's status
    fetch       only fetch the application into the cache

When ``SCHEMA_REGISTRY_URL`` is already set, ``up``/``run`` start nothing and use that registry.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.kafka_local import free_port

APICURIO_VERSION = "3.3.3"
ARTIFACT = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
GET_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.7.1:get"
MIN_JAVA = 21
#: Where Debian and Ubuntu install JDKs (the Temurin packages too), side by side.
JVM_ROOT = Path("/usr/lib/jvm")
#: Where the Confluent-compatible API lives on an Apicurio server.
CCOMPAT_PATH = "/apis/ccompat/v7"
START_DEADLINE_S = 120.0
READY_POLL_S = 0.2
STOP_GRACE_S = 15.0
ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".registry"
STATE_FILE = STATE_DIR / "state.json"

_SETTINGS = """<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0">
  <mirrors>
    <!-- Apicurio's parent POM names repositories not reachable everywhere: everything goes to Central. -->
    <mirror>
      <id>central-only</id>
      <mirrorOf>*</mirrorOf>
      <url>https://repo.maven.apache.org/maven2</url>
    </mirror>
  </mirrors>
</settings>
"""


class RegistryError(RuntimeError):
    """The local registry could not be fetched, started or stopped; the message says why."""


def cache_dir() -> Path:
    """Where the application lives: outside git, shared by every clone on the machine (as the Kafka jars)."""
    base = os.environ.get("RR_KAFKA_CACHE") or Path.home() / ".cache" / "rr-consumer"
    return Path(base) / f"apicurio-registry-{APICURIO_VERSION}"


def fetch_app() -> Path:
    """Fetch and unpack the application once; return the folder that holds ``quarkus-run.jar``."""
    target = cache_dir()
    app = target / "app"
    done = target / ".complete"
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs fetching at once must not interleave
        if done.exists():
            return _app_root(app)
        if shutil.which("mvn") is None:
            raise RegistryError("Maven (mvn) is not on PATH: it is needed once to fetch Apicurio Registry")
        settings = target / "settings.xml"
        settings.write_text(_SETTINGS)
        repo = target / "m2"
        command = [
            "mvn",
            "-q",
            "-B",
            "-s",
            str(settings),
            f"-Dmaven.repo.local={repo}",
            GET_PLUGIN,
            f"-Dartifact={ARTIFACT}",
            "-Dtransitive=false",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RegistryError(
                f"fetching Apicurio Registry {APICURIO_VERSION} ({ARTIFACT}) failed:\n"
                f"{_tail(result.stdout + result.stderr)}"
            )
        archives = list(repo.glob(f"io/apicurio/apicurio-registry-app/{APICURIO_VERSION}/*-all.tar.gz"))
        if not archives:
            raise RegistryError(f"Maven reported success but no {ARTIFACT} archive is in {repo}")
        shutil.rmtree(app, ignore_errors=True)
        with tarfile.open(archives[0]) as archive:
            archive.extractall(app, filter="data")
        root = _app_root(app)
        shutil.rmtree(repo, ignore_errors=True)  # the unpacked copy is what runs; 159 MB less in the cache
        done.write_text(APICURIO_VERSION)
    return root


def _app_root(app: Path) -> Path:
    found = sorted(app.rglob("quarkus-run.jar"))
    if not found:
        raise RegistryError(f"no quarkus-run.jar under {app}: delete {app.parent} to fetch it again")
    return found[0].parent


def _java_version(java: Path) -> int | None:
    """The feature version of a ``java`` binary (``25`` for 25.0.1), or None when it does not run."""
    try:
        result = subprocess.run(
            [str(java), "-XshowSettings:properties", "-version"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"java\.specification\.version = (\d+)", result.stderr + result.stdout)
    return int(match.group(1)) if match else None


def find_java(minimum: int = MIN_JAVA, jvm_root: Path = JVM_ROOT) -> Path:
    """A ``java`` of version ``minimum`` or newer: ``JAVA_HOME``'s if new enough, else the newest of the JDKs
    under ``jvm_root`` and the one on PATH. Raises :class:`RegistryError` naming what was found."""
    seen: list[str] = []
    candidates: list[Path] = []
    home = os.environ.get("JAVA_HOME")
    if home:
        candidates.append(Path(home) / "bin" / "java")
    candidates.extend(sorted(jvm_root.glob("*/bin/java")))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path))
    best: tuple[int, Path] | None = None
    for java in candidates:
        if not java.exists():
            continue
        version = _java_version(java)
        seen.append(f"{java} ({version or 'unknown version'})")
        if home and java == Path(home) / "bin" / "java" and version is not None and version >= minimum:
            return java  # JAVA_HOME chosen on purpose wins when it is new enough
        if version is not None and version >= minimum and (best is None or version > best[0]):
            best = (version, java)
    if best is None:
        raise RegistryError(
            f"Apicurio Registry needs Java {minimum} or newer: set JAVA_HOME to such a JDK "
            f"(found: {', '.join(seen) or 'no java at all'})"
        )
    return best[1]


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Registry:
    """A running (or stopped) local registry: ``url`` is the Confluent-compatible API's base URL."""

    url: str
    pid: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def log_tail(self, lines: int = 40) -> str:
        path = self.data_dir / "registry.log"
        if not path.exists():
            return "(the registry wrote no log)"
        return f"--- registry.log (last {lines} lines) ---\n" + _tail(path.read_text(errors="replace"), lines)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return False
        return True


def start(data_root: Path | None = None, deadline_s: float = START_DEADLINE_S) -> Registry:
    """Start a fresh registry, wait until it is ready, set BACKWARD compatibility, and return it."""
    app = fetch_app()
    java = find_java()
    data_dir = Path(tempfile.mkdtemp(prefix="rr-registry-", dir=data_root))
    port, management = free_port(), free_port()
    with open(data_dir / "registry.log", "ab") as out:
        process = subprocess.Popen(
            [
                str(java),
                "-Xms64m",
                "-Xmx512m",
                "-XX:+UseSerialGC",  # one small heap, two cores shared with the broker and the suite
                "-XX:TieredStopAtLevel=1",  # starts seconds faster; the tests do not load it for long
                f"-Dquarkus.http.port={port}",
                "-Dquarkus.http.host=127.0.0.1",
                f"-Dquarkus.management.port={management}",
                "-Dquarkus.management.host=127.0.0.1",
                # Tests name topics (and so subjects) uniquely: the default cap of 1,000 ccompat subjects is
                # within reach of one suite run against one registry.
                "-Dapicurio.ccompat.max-subjects=1000000",
                "-jar",
                str(app / "quarkus-run.jar"),
            ],
            cwd=data_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() signals the JVM, not our shell
        )
    registry = Registry(
        url=f"http://127.0.0.1:{port}{CCOMPAT_PATH}", pid=process.pid, data_dir=data_dir, process=process
    )
    try:
        _wait_ready(registry, process, f"http://127.0.0.1:{management}/health/ready", deadline_s)
        _settle(registry)
    except BaseException:
        stop(registry)
        raise
    return registry


def _settle(registry: Registry) -> None:
    """Set Confluent's compatibility default and warm the error paths; a failure shows the registry's log."""
    try:
        set_compatibility(registry.url, "BACKWARD")
        warm_up(registry.url)
    except RegistryError as exc:
        raise RegistryError(f"{exc}\n{registry.log_tail()}") from exc


def _wait_ready(registry: Registry, process: subprocess.Popen[bytes], health: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RegistryError(
                f"the registry exited with status {process.returncode} before it was ready\n"
                f"{registry.log_tail()}"
            )
        try:
            with urllib.request.urlopen(health, timeout=2) as answer:
                if answer.status == 200:
                    # Health can be up a moment before the API routes are: ask the API itself.
                    with urllib.request.urlopen(f"{registry.url}/subjects", timeout=2) as api:
                        if api.status == 200:
                            return
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(READY_POLL_S)
    raise RegistryError(
        f"the registry at {registry.url} was not ready within {deadline_s:.0f}s ({last_error})\n"
        f"{registry.log_tail()}"
    )


#: Paths a run meets that answer errors (an unknown id, GUID, subject or path): each answered once here.
WARM_UP_PATHS = (
    "/schemas/ids/2147483647",
    "/schemas/guids/00000000-0000-0000-0000-000000000000",
    "/subjects/rr-warm-up/versions",
    "/subjects/rr-warm-up/versions/latest",
    "/apis/wrong/subjects",
    "/config",
)
#: How long a first answer may take while the registry loads the code behind it, on a loaded machine.
WARM_UP_TIMEOUT_S = 60.0


def warm_up(url: str) -> None:
    """Ask each of :data:`WARM_UP_PATHS` once, without changing the registry's state.

    Apicurio (Quarkus, started with the client compiler only) loads the code behind a path on its first
    request: under a loaded CI run a first answer on a path not served before took over 5 s, the relay's
    registry timeout (a 404 for a wrong path, a first ``/schemas/guids`` look-up, a first registration), and
    tests failed on the registry's start-up cost rather than on what they test. Whatever it answers is fine
    here; only the wait is taken out of the tests.
    """
    for path in WARM_UP_PATHS:
        _warm_up_path(url, path)


def _warm_up_path(url: str, path: str) -> None:
    # A connection the registry drops without an answer (seen once, in a CI run whose Helm build loaded both
    # cores) is asked again until the deadline: only a registry that never answers the path stops the run.
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=max(deadline - time.monotonic(), 1.0)):
                return
        except urllib.error.HTTPError:
            return  # an error answer is what most of these paths give: it has been served, which is the point
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() + READY_POLL_S >= deadline:
                message = f"the registry at {url} did not answer {path} when warmed up: {exc}"
                raise RegistryError(message) from exc
        time.sleep(READY_POLL_S)


def set_compatibility(url: str, level: str) -> None:
    """Set the registry's global compatibility (Apicurio's default is NONE; Confluent's is BACKWARD)."""
    request = urllib.request.Request(
        f"{url}/config",
        data=json.dumps({"compatibility": level}).encode(),
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        method="PUT",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = json.loads(answer.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryError(f"setting the registry's compatibility to {level} failed: {exc}") from exc
    if body.get("compatibility", level) != level:
        raise RegistryError(f"the registry kept compatibility {body.get('compatibility')!r}, not {level}")


def stop(registry: Registry, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the registry, SIGKILL it after ``grace_s``, reap it, and remove its data directory."""
    _signal(registry, signal.SIGTERM)
    if not _wait_exit(registry, grace_s):
        _signal(registry, signal.SIGKILL)
        _wait_exit(registry, grace_s)
    shutil.rmtree(registry.data_dir, ignore_errors=True)


def _signal(registry: Registry, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(registry.pid, signum)


def _wait_exit(registry: Registry, timeout_s: float) -> bool:
    if registry.process is not None:
        try:
            registry.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout_s
    while registry.alive():  # started by another process (`up`): we can only watch the process table
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def running() -> Iterator[str]:
    """The URL of a registry for the duration of the block: the configured one, or a fresh one."""
    configured = os.environ.get("SCHEMA_REGISTRY_URL")
    if configured:
        yield configured
        return
    registry = start()
    try:
        yield registry.url
    finally:
        stop(registry)


# --- command line -------------------------------------------------------------------------------------


def _cmd_up() -> int:
    if os.environ.get("SCHEMA_REGISTRY_URL"):
        print(os.environ["SCHEMA_REGISTRY_URL"])
        return 0
    state = _read_state()
    if state is not None and state.alive():
        print(state.url)
        return 0
    STATE_DIR.mkdir(exist_ok=True)
    registry = start(data_root=STATE_DIR)
    STATE_FILE.write_text(
        json.dumps({"url": registry.url, "pid": registry.pid, "data_dir": str(registry.data_dir)})
    )
    print(registry.url)
    return 0


def _cmd_down() -> int:
    state = _read_state()
    if state is not None:
        stop(state)
        STATE_FILE.unlink(missing_ok=True)
    return 0


def _cmd_url() -> int:
    if os.environ.get("SCHEMA_REGISTRY_URL"):
        print(os.environ["SCHEMA_REGISTRY_URL"])
        return 0
    state = _read_state()
    if state is None or not state.alive():
        print("no local registry is running: python -m tools.registry_local up", file=sys.stderr)
        return 1
    print(state.url)
    return 0


def _cmd_run(command: Sequence[str]) -> int:
    if not command:
        print("run: give the command to run after --", file=sys.stderr)
        return 2
    with running() as url:
        env = {**os.environ, "SCHEMA_REGISTRY_URL": url}
        child = subprocess.Popen(list(command), env=env)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            return child.wait()


def _read_state() -> Registry | None:
    if not STATE_FILE.exists():
        return None
    raw = json.loads(STATE_FILE.read_text())
    return Registry(url=raw["url"], pid=int(raw["pid"]), data_dir=Path(raw["data_dir"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.registry_local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["up", "down", "url", "run", "fetch"])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="with run: the command (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.action == "fetch":
            print(fetch_app())
            return 0
        if args.action == "run":
            return _cmd_run(command)
        return {"up": _cmd_up, "down": _cmd_down, "url": _cmd_url}[args.action]()
    except RegistryError as error:
        print(f"registry_local: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
