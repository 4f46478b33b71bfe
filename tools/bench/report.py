"""``BENCHMARKS.md``: the summary table, the machine, the workload, the details, where the time goes.

The file is rewritten whole by every run; earlier tables live on in its git history. The analysis of the
profile is prose a person wrote (``where_the_time_goes.md`` beside this module) and is carried into every
report as it is, under the tables the run itself produced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from tools.bench.figures import Figure
from tools.bench.profile import Profile, render
from tools.bench.workload import Workload

FINDINGS: Final = Path(__file__).with_name("where_the_time_goes.md")


def render_report(
    *,
    machine: Mapping[str, str],
    workload: Workload,
    figures: Sequence[Figure],
    profiles: Sequence[Profile],
    command: str,
    repeats: int,
    seconds: float,
    quick: bool,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {machine['date']} in {seconds / 60:.1f} minutes"
        + (" — **the smoke version (`--quick`): tiny workload, figures meaningless**" if quick else "")
        + ". Earlier runs are in this file's git history (`git log -p BENCHMARKS.md`).",
        "",
        "Each figure is measured in the same run as its reference, repeat by repeat, and the ratio is taken "
        "per repeat: on a noisy 2-core machine the ratio is what compares between runs. "
        f"Medians of {repeats} repeat(s), the range of the repeats in brackets.",
        "",
        "| figure | measured | reference in the same run | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for figure in figures:
        for row in figure.rows:
            lines.append(
                f"| {row.figure} | {row.measured} | {row.reference} | {row.ratio} | {row.target} | "
                f"{row.result} |"
            )
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    lines += [
        "",
        "## Workload",
        "",
        workload.describe() + f"; produced in {workload.produce_s:.0f} s.",
        "",
        "Every run reads it from the start through a fresh consumer group. The tracking API is the "
        "emulator (`rr-consumer emulator --max-events 0`) in its own process; every contender is a process "
        "of its own, so that its CPU time and memory are its own. Throughput is measured over a window cut "
        "out of the middle of a run (after a warm-up of accepted events), by the emulator's counters.",
        "",
        "## Details",
        "",
    ]
    for figure in figures:
        if figure.rows and figure.details:
            lines.append(f"- **{figure.rows[0].key}**: " + "; ".join(figure.details))
    lines += ["", "## Where the time goes", ""]
    if profiles:
        lines += ["### This run's profiles", ""]
        for profile in profiles:
            lines += render(profile)
    if FINDINGS.exists():
        lines += [FINDINGS.read_text().strip(), ""]
    lines += [
        "## How to run",
        "",
        "```sh",
        "make bench                          # python -m tools.bench: every figure, about 15 minutes",
        "python -m tools.bench --quick       # the smoke version (tiny workload, one repeat)",
        "python -m tools.bench --only batch,cpu --repeats 5 --output /tmp/b.md",
        "python -m tools.bench --set 'delivery.batch_max_events=1000'   # any relay setting, every run",
        "```",
        "",
        "It uses the broker named by `KAFKA_BOOTSTRAP_SERVERS`, or starts one with `tools.kafka_local`. "
        "Topics it creates are named `bench-…` and deleted at the end.",
        "",
    ]
    return "\n".join(lines)
