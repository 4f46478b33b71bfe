"""The runtime wheel stands on its own: built from this checkout, installed where no checkout is, it runs.

A source checkout hides what a wheel lacks: the tests import from the working tree, so a file the wheel
leaves out (the Avro schemas, once) or a module that only exists beside the package is found anyway. Here the
wheel is built as a user would build it (``python -m build``: an sdist, then the wheel from the sdist, each in
an isolated build environment), installed with its pinned dependencies into a fresh virtual environment in a
temporary directory, and run from there with a clean environment: ``--help``, ``config check`` and a short
``run`` against the suite's broker. The wheel is built and installed once per session.

The other half of "self-contained" is "nothing more": the wheel must hold no development module (the
emulator, the traffic generator, the local broker, the registry double, the tests), and no runtime module may
import one, so that the production image carries none of it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from consumer import __version__
from consumer.cli import COMMANDS_GROUP, DEV_COMMANDS
from consumer_dev.emulator import EmulatorThread
from tests.kafka import Topics, produce, unique_name
from tests.relay import SHOPS, RelayProcess, generate, relay_env, wait_delivered, write_config

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_PACKAGE = "consumer"
#: The development tools' package and the checkout's own folders: none of them belongs in the wheel.
DEVELOPMENT_PACKAGES = ("consumer_dev", "tools", "tests", "dev")
#: Module names of the development tools, wherever they would sit in the wheel (consumer/emulator.py, ...);
#: but ``cli``, the name of the dev package's command registration as well as of the runtime's command line.
DEVELOPMENT_MODULES = frozenset(path.stem for path in (ROOT / "dev" / "consumer_dev").glob("*.py")) - {
    "__init__",
    "cli",
}
BUILD_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 600


# --- what a wheel holds ----------------------------------------------------------------------------------


def development_files(names: Iterable[str]) -> list[str]:
    """The files of a wheel (its member names) that are development code rather than the runtime."""
    found = []
    for name in names:
        path = PurePosixPath(name)
        top = path.parts[0]
        if top.endswith((".dist-info", ".data")):
            continue
        if top != RUNTIME_PACKAGE or (path.suffix == ".py" and path.stem in DEVELOPMENT_MODULES):
            found.append(name)
    return found


def test_the_development_file_check_finds_each_kind_of_development_file() -> None:
    """The check on a made-up wheel, so it is known to fail on what it must (and only on that)."""
    names = [
        "consumer/__init__.py",
        "consumer/decode.py",
        "consumer/schemas/OrderPlaced.avsc",
        "rr_consumer-0.1.0.dist-info/METADATA",
        "consumer/emulator.py",
        "consumer/sample.py",
        "consumer_dev/emulator.py",
        "tools/kafka_local.py",
        "tests/conftest.py",
    ]
    assert development_files(names) == names[4:]
    assert {"emulator", "sample", "sample_producer"} <= DEVELOPMENT_MODULES


@dataclass(frozen=True)
class Built:
    """A wheel built from this checkout, and a fresh virtual environment it is installed in."""

    wheel: Path
    venv: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def clean_env(**extra: str) -> dict[str, str]:
    """An environment with nothing that would lead Python back to the checkout or this suite's venv."""
    env = {
        key: value
        for key, value in relay_env().items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")
        and not key.startswith("PYTEST")
    }
    env.update(extra)
    return env


def build_wheel(source: Path, dist: Path) -> Path:
    """``python -m build`` of ``source`` (an sdist, then the wheel from it); the wheel's path."""
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
        cwd=dist.parent,
    )
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, found {wheels}"
    return wheels[0]


def install(environment: Path, *wheels: Path) -> None:
    """A fresh virtual environment at ``environment`` with ``wheels`` and their pinned dependencies."""
    venv.EnvBuilder(with_pip=True, clear=True).create(environment)
    subprocess.run(
        [str(environment / "bin" / "python"), "-m", "pip", "install", "--quiet", *map(str, wheels)],
        check=True,
        capture_output=True,
        timeout=INSTALL_TIMEOUT_S,
        cwd=environment.parent,
        env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    folder = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(ROOT, folder / "dist")
    install(folder / "venv", wheel)
    return Built(wheel, folder / "venv")


@pytest.fixture(scope="session")
def dev_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The development tools' wheel. Not installed here: that its commands reach the CLI is shown by the
    suite's own (editable) install, and another virtual environment would cost the suite a quarter minute."""
    return build_wheel(ROOT / "dev", tmp_path_factory.mktemp("dev-wheel") / "dist")


def test_the_wheel_holds_the_runtime_package_and_no_development_module(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        names = wheel.namelist()
        entry_points = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        declared = wheel.read(entry_points).decode() if entry_points else ""
    assert "consumer/cli.py" in names
    assert not development_files(names), f"development code in the runtime wheel: {development_files(names)}"
    assert "rr_consumer.commands" not in declared, "the runtime wheel registers development commands"


def test_the_wheel_holds_every_reader_schema(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        schemas = {PurePosixPath(n).name for n in wheel.namelist() if n.startswith("consumer/schemas/")}
    expected = {path.name for path in (ROOT / "consumer" / "schemas").glob("*.avsc")}
    assert expected, "the checkout has no schemas in consumer/schemas/"
    assert schemas == expected


def imported_modules(source: Path) -> set[str]:
    tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_runtime_module_imports_development_code() -> None:
    """Not even lazily inside a function: the development commands reach the CLI through entry points."""
    offenders = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in sorted((ROOT / RUNTIME_PACKAGE).rglob("*.py"))
        for module in imported_modules(path)
        if module.partition(".")[0] in DEVELOPMENT_PACKAGES
        or module.removeprefix(f"{RUNTIME_PACKAGE}.") in DEVELOPMENT_MODULES
    }
    assert not offenders, f"runtime modules import development code: {sorted(offenders)}"


def test_the_dev_wheel_holds_the_development_package_and_declares_its_commands(dev_wheel: Path) -> None:
    """The tools come apart from the runtime: no copy of ``consumer`` in it, the commands as entry points."""
    with zipfile.ZipFile(dev_wheel) as wheel:
        names = wheel.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        declared = wheel.read(entry_points).decode()
    tops = {PurePosixPath(name).parts[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"consumer_dev"}
    assert f"[{COMMANDS_GROUP}]" in declared
    for command in DEV_COMMANDS:
        assert f"{command} = consumer_dev.cli:" in declared


# --- the installed wheel runs --------------------------------------------------------------------------


def run_installed(
    built: Built, *args: str, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(built.bin("rr-consumer")), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_env(),
        timeout=timeout,
        check=False,
    )


def test_the_installed_package_is_the_wheel_not_the_checkout(built: Built, tmp_path: Path) -> None:
    """Everything below runs the wheel's code: the proof that it is not this checkout's."""
    found = subprocess.run(
        [
            str(built.bin("python")),
            "-c",
            "import consumer, consumer.decode as d; print(consumer.__file__, d.SCHEMAS_DIR)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=60,
        check=True,
    ).stdout.split()
    assert all(Path(path).is_relative_to(built.venv) for path in found), found
    no_dev = subprocess.run(
        [str(built.bin("python")), "-c", "import consumer_dev"],
        capture_output=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert no_dev.returncode != 0, "consumer_dev is importable where only the wheel is installed"


def test_the_installed_command_answers_help(built: Built, tmp_path: Path) -> None:
    answer = run_installed(built, "--help", cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr
    for command in ("run", "config", "replay", "dlq"):
        assert f"    {command} " in answer.stdout
    version = run_installed(built, "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"rr-consumer {__version__}"


@pytest.mark.parametrize("command", sorted(DEV_COMMANDS))
def test_a_development_command_says_where_it_comes_from(built: Built, tmp_path: Path, command: str) -> None:
    """Without rr-consumer-dev, the development commands exit 2 with one line saying where to get them."""
    answer = run_installed(built, command, "--port", "8080", cwd=tmp_path)
    assert answer.returncode == 2
    lines = answer.stderr.strip().splitlines()
    assert len(lines) == 1, answer.stderr
    assert lines[0].startswith(f"rr-consumer: {command}: ")
    assert "rr-consumer-dev" in lines[0]
    assert "pip install" in lines[0]
    assert answer.stdout == ""


@pytest.fixture
def json_topic(topics: Topics) -> str:
    name = topics.create("wheel")
    topics.create_named(f"{name}.dlq")
    return name


def test_the_installed_command_checks_a_configuration_against_the_broker(
    built: Built, kafka_bootstrap: str, json_topic: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "relay.toml",
        bootstrap=kafka_bootstrap,
        topics=[json_topic],
        group=unique_name("wheel"),
        emulator_url="http://127.0.0.1:9/1.0/",  # no tracking call is made by a check
        fmt="json",
    )
    answer = run_installed(built, "config", "check", "--config", str(config), cwd=tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "FAIL" not in answer.stdout
    checked = [line for line in answer.stdout.splitlines() if line.startswith("ok ")]
    assert any(json_topic in line for line in checked), answer.stdout


@dataclass
class InstalledRelay(RelayProcess):
    """``rr-consumer run`` of the installed wheel, started outside the checkout."""

    executable: Path = Path("rr-consumer")
    cwd: Path = Path("/")

    def start(self) -> InstalledRelay:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(self.executable), "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        return self


@pytest.fixture
def installed_relay(built: Built, tmp_path: Path) -> Iterator[list[InstalledRelay]]:
    started: list[InstalledRelay] = []
    yield started
    for relay in started:
        relay.cleanup()


def test_the_installed_relay_delivers_events_and_stops_cleanly(
    built: Built,
    kafka_bootstrap: str,
    json_topic: str,
    emulator: EmulatorThread,
    installed_relay: list[InstalledRelay],
    tmp_path: Path,
) -> None:
    """Decoding needs the reader schemas: delivered events prove the wheel's package data is found."""
    config = write_config(
        tmp_path / "relay.toml",
        bootstrap=kafka_bootstrap,
        topics=[json_topic],
        group=unique_name("wheel"),
        emulator_url=emulator.url,
        fmt="json",
        shops=tuple(SHOPS),
    )
    traffic = generate(20, fmt="json", shops=tuple(SHOPS))
    relay = InstalledRelay(
        config=config,
        log=tmp_path / "relay.log",
        env=clean_env(),
        executable=built.bin("rr-consumer"),
        cwd=tmp_path,
    )
    installed_relay.append(relay.start())
    produce(kafka_bootstrap, json_topic, traffic.records)
    wait_delivered(emulator, traffic.expected, relays=[relay])
    assert relay.terminate() == 0, relay.output()[-3000:]
