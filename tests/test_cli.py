"""The command line: every command documents itself with examples, and --version answers."""

from __future__ import annotations

import pytest

from consumer import __version__
from consumer.cli import main

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
