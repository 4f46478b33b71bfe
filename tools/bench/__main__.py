"""``python -m tools.bench``: run every figure and write ``BENCHMARKS.md`` (see the package docstring).

python -m tools.bench                        # the full benchmark, about 15 minutes
python -m tools.bench --quick --output x.md  # the smoke version: tiny workload, one repeat, no profile
python -m tools.bench --only batch,cpu --repeats 5 --set 'kafka.consume_batch=1000'
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from confluent_kafka.admin import AdminClient

from tools.bench.figures import FIGURES, Figure
from tools.bench.profile import Profile, profile_relay
from tools.bench.report import render_report
from tools.bench.runs import FULL, QUICK, Bench, Sizes
from tools.bench.stack import (
    ROOT,
    SHOPS,
    BenchError,
    Emulator,
    Topics,
    broker,
    load_average,
    machine,
    revision,
)
from tools.bench.workload import PARTITIONS, produce_backlog
from tools.registry_double import RegistryDouble


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="the smoke version: tiny workload, one repeat")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="repeats of each figure (default: 3; --quick: 1)")
    parser.add_argument(
        "--records", type=int, help="size of the backlog (default: 1,000,000; --quick: 3,000)"
    )
    parser.add_argument("--only", help=f"comma-separated figures, of: {', '.join(FIGURES)}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a relay setting for every run (VALUE is JSON, or else a string); repeatable",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy (always skipped by --quick)")
    parser.add_argument("--keep-files", action="store_true", help="keep the run's logs and configurations")
    args = parser.parse_args(argv)
    unknown = set(_selected(args)) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(sorted(unknown))}")
    if args.repeats is not None and not 1 <= args.repeats <= 20:
        parser.error("--repeats must be between 1 and 20")
    if args.records is not None and not 1_000 <= args.records <= 5_000_000:
        parser.error("--records must be between 1,000 and 5,000,000")
    try:
        args.overrides = _overrides(args.set)
    except ValueError as error:
        parser.error(str(error))
    missing = missing_packages(_selected(args))
    if missing:
        parser.error(
            f"{', '.join(missing)} not installed: pip install -e '.[bench]' (or leave out the figures "
            f"that need them with --only)"
        )
    return args


def _selected(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.only.split(",")] if args.only else list(FIGURES)


def _overrides(settings: Sequence[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for setting in settings:
        path, sep, text = setting.partition("=")
        section, dot, key = path.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--set wants SECTION.KEY=VALUE, got {setting!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides.setdefault(section, {})[key] = value
    return overrides


#: Figures whose contenders need a package beyond the project's own (the ``bench`` extra).
NEEDS: dict[str, tuple[str, ...]] = {"naive": ("requests",), "arroyo": ("arroyo", "requests")}


def missing_packages(selected: Sequence[str]) -> list[str]:
    """The packages the selected figures need that are not installed: found before anything starts."""
    wanted = {module for name in selected for module in NEEDS.get(name, ())}
    return sorted(module for module in wanted if importlib.util.find_spec(module) is None)


def sizes_for(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    if args.records is not None:
        sizes = dataclasses.replace(sizes, records=args.records)
    if args.no_profile:
        sizes = dataclasses.replace(sizes, profile_seconds=0.0)
    return sizes


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    sizes = sizes_for(args)
    started = time.monotonic()
    load_at_start, revision_at_start = load_average(), revision()
    run_dir = Path(tempfile.mkdtemp(prefix="rr-bench-"))
    say(f"logs and configurations in {run_dir}")
    ok = False
    with broker() as bootstrap:
        topics = Topics(AdminClient({"bootstrap.servers": bootstrap}))
        try:
            with RegistryDouble() as registry:
                topic = topics.create("backlog", PARTITIONS)
                say(f"producing {sizes.records:,} events to {topic} on {bootstrap}")
                workload = produce_backlog(bootstrap, topic, registry.url, sizes.records, SHOPS)
                say(f"produced in {workload.produce_s:.1f}s: {workload.describe()}")
                with Emulator(SHOPS, run_dir / "emulator.log") as emulator:
                    bench = Bench(
                        bootstrap, workload, emulator, run_dir, sizes, args.overrides, topics=topics
                    )
                    figures = _figures(bench, _selected(args))
                    profiles = _profiles(bench) if sizes.profile_seconds and not args.quick else []
            text = render_report(
                machine=machine(bootstrap, load_at_start, revision_at_start),
                workload=workload,
                figures=figures,
                profiles=profiles,
                command=shlex.join(["python", "-m", "tools.bench", *(args.argv or [])]),
                repeats=sizes.repeats,
                seconds=time.monotonic() - started,
                quick=args.quick,
            )
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
            say(f"wrote {args.output} in {(time.monotonic() - started) / 60:.1f} minutes")
            ok = True
        finally:
            topics.delete_all()
            del topics  # and with it the admin client, destroyed now, while the broker is still up
            if ok and not args.keep_files:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                say(f"kept {run_dir}")
    return 0


def _figures(bench: Bench, selected: Sequence[str]) -> list[Figure]:
    figures = []
    for name, function in FIGURES.items():
        if name not in selected:
            continue
        began = time.monotonic()
        say(f"figure {name} ...")
        figure = function(bench)
        for row in figure.rows:
            say(f"  {row.key}: {row.measured} | {row.reference} | {row.ratio} | {row.result}")
        say(f"figure {name} took {time.monotonic() - began:.0f}s")
        figures.append(figure)
    return figures


def _profiles(bench: Bench) -> list[Profile]:
    profiles = []
    for mode in ("batch", "single"):
        say(f"profiling the relay in {mode} mode ...")
        try:
            profiles.append(profile_relay(bench, mode, bench.sizes.profile_seconds))
        except BenchError as error:
            say(f"no profile of {mode} mode: {error}")
    return profiles


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C: every child process, emulator and topic is cleaned up on the way out."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return run(args)
    except BenchError as error:
        say(f"failed: {error}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
