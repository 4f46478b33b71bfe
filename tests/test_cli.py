"""The command line: every command documents itself with examples, and --version answers."""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from consumer import __version__, cli
from consumer.cli import main

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = [
    ["run"],
    ["config"],
    ["config", "check"],
    ["emulator"],
    ["produce-sample"],
    ["replay"],
    ["dlq"],
    ["dlq", "inspect"],
    ["dlq", "redrive"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "example" in capsys.readouterr().out.lower()


def test_version_is_the_packages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"rr-consumer {__version__}"


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


# --- the development commands come from rr-consumer-dev ---------------------------------------------------


def test_the_development_commands_come_from_the_dev_distributions_entry_points() -> None:
    """Installed here (make venv), rr-consumer-dev declares exactly the commands the CLI knows are its."""
    declared = {entry.name for entry in entry_points(group=cli.COMMANDS_GROUP)}
    assert declared == set(cli.DEV_COMMANDS)
    dev = tomllib.loads((ROOT / "dev" / "pyproject.toml").read_text(encoding="utf-8"))
    assert set(dev["project"]["entry-points"][cli.COMMANDS_GROUP]) == set(cli.DEV_COMMANDS)


@pytest.mark.parametrize("command", sorted(cli.DEV_COMMANDS))
def test_without_the_dev_tools_a_development_command_says_where_it_comes_from(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    assert main([command, "--port", "8080", "--shop", "demo:key"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rr-consumer: {command}: {cli.DEV_HINT}"]


def test_without_the_dev_tools_an_unknown_option_elsewhere_is_still_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the stand-ins take any arguments; the relay's own commands still refuse a misspelt option."""
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    with pytest.raises(SystemExit) as exited:
        main(["run", "--confg", "x.toml"])
    assert exited.value.code == 2


def test_the_dev_distribution_requires_this_version_of_the_runtime() -> None:
    """Both come from one checkout: the tools drive the relay of the same version."""
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    dev = tomllib.loads((ROOT / "dev" / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert dev["version"] == runtime == __version__
    assert dev["dependencies"] == [f"rr-consumer=={runtime}"]
