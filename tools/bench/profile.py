"""Where the time goes: py-spy on the relay process in the middle of a run, summarised for the report.

py-spy samples the relay from outside (no code change, no in-process profiler skewing the loop), only when a
thread holds the GIL (``--gil``): on a process that is bound by Python work, that is where the CPU goes. The
operating system's per-thread CPU times over the same seconds add what py-spy cannot see — librdkafka's C
threads — and how much of a core the GIL-bound threads get together.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psutil

from tools.bench.contenders import start_relay
from tools.bench.runs import Bench
from tools.bench.stack import BenchError

RATE_HZ: Final = 100
TOP: Final = 15
#: Our own code: what a reader of the profile can change.
PROJECT_FRAME: Final = re.compile(r"\((?:.*/)?consumer/")
#: Frames under which everything of a thread runs: 100 % of it, and nothing to learn.
ENTRY_FRAME: Final = re.compile(
    r"^(<module> |main |_add_run\.<locals>\.run |run \(consumer/service|Intake\._run |Intake\._iteration )"
)


@dataclass
class Profile:
    """A summary of one profile: shares of GIL-holding samples, and CPU per thread."""

    mode: str
    seconds: float
    samples: int
    events_per_s: float
    threads: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    thread_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def gil_share(self) -> float:
        """How much of the wall-clock time some thread of the relay held the GIL."""
        return self.samples / (RATE_HZ * self.seconds) if self.seconds else 0.0


def py_spy() -> str | None:
    """The py-spy executable: on PATH, or beside this interpreter (a venv's ``bin``)."""
    found = shutil.which("py-spy")
    beside = Path(sys.executable).with_name("py-spy")
    return found or (str(beside) if beside.exists() else None)


def profile_relay(bench: Bench, mode: str, seconds: float) -> Profile:
    """Run the relay in ``mode`` on the backlog and profile it for ``seconds`` after its warm-up."""
    executable = py_spy()
    if executable is None:
        raise BenchError("py-spy is not installed (pip install py-spy): no profile")
    config, log = bench.config(f"profile-{mode}", mode=mode)
    raw = bench.run_dir / f"profile-{mode}.txt"
    bench.emulator.reset()
    warmup = bench.sizes.batch[0] if mode == "batch" else bench.sizes.single[0]
    with start_relay(config, bench.workload, log) as relay:
        bench.window_of(bench.emulator, relay, (warmup, 1))
        process = psutil.Process(relay.pid)
        before = _thread_cpu(process)
        accepted, started = bench.emulator.accepted(), time.monotonic()
        command = [executable, "record", "--pid", str(relay.pid), "--duration", f"{seconds:.0f}"]
        # --nonblocking: sampling without stopping the process; stopping it 100 times a second halved the
        # rate of single mode, whose every request is a handful of short steps on the event loop.
        command += ["--rate", str(RATE_HZ), "--format", "raw", "--threads", "--gil", "--nonblocking"]
        command += ["-o", str(raw)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 60)
        elapsed = time.monotonic() - started
        rate = (bench.emulator.accepted() - accepted) / elapsed
        after = _thread_cpu(process)
        names = _thread_names(relay.pid, after)  # while the threads still exist
    if done.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed: {done.stderr.strip()[-500:]}")
    profile = summarise(raw.read_text(), mode, float(seconds), rate)
    for tid, cpu in after.items():
        used = (cpu - before.get(tid, 0.0)) / elapsed
        if used >= 0.005:
            profile.thread_cpu[names.get(tid, str(tid))] = used
    return profile


def summarise(raw: str, mode: str, seconds: float, events_per_s: float) -> Profile:
    """Fold py-spy's collapsed stacks (``thread;frame;frame count`` lines) into shares."""
    profile = Profile(mode, seconds, 0, events_per_s)
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        profile.samples += count
        profile.threads[_thread_label(thread)] += count
        functions = [_function(frame) for frame in frames]
        if functions:
            profile.own[functions[-1]] += count
        for function in set(functions):
            if PROJECT_FRAME.search(function) and not ENTRY_FRAME.search(function):
                profile.total[function] += count
    return profile


def _function(frame: str) -> str:
    """``Intake._prepare (consumer/intake.py:205)`` → ``Intake._prepare (consumer/intake.py)``."""
    frame = re.sub(r":\d+\)$", ")", frame)
    return re.sub(r"\((?:/[^()]*/)?(site-packages|main|lib/python3\.\d+)/", "(", frame)


def _thread_label(thread: str) -> str:
    """``thread (30402): rr-intake`` → ``rr-intake``."""
    _, _, name = thread.partition("): ")
    return name or thread


def _thread_cpu(process: psutil.Process) -> dict[int, float]:
    try:
        return {thread.id: thread.user_time + thread.system_time for thread in process.threads()}
    except psutil.Error:
        return {}


def _thread_names(pid: int, threads: dict[int, float]) -> dict[int, str]:
    """The kernel's name of each thread: librdkafka names its own (``rdk:broker1``); Python's are "python"."""
    names = {}
    for tid in threads:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            name = "?"
        names[tid] = "main thread" if tid == pid else f"{name} ({tid})"
    return names


def render(profile: Profile) -> list[str]:
    """The profile as Markdown: threads, then the hottest functions by own time and by total time."""
    samples = profile.samples or 1
    lines = [
        f"#### `{profile.mode}` mode: {profile.events_per_s:,.0f} events/s while profiled "
        f"({profile.seconds:.0f} s, {RATE_HZ} Hz, GIL-holding samples only)",
        "",
        f"Some thread of the relay held the GIL {profile.gil_share:.0%} of the time.",
        "",
        "| thread | share of GIL-holding samples |",
        "|---|---|",
        *(f"| {name} | {count / samples:.1%} |" for name, count in profile.threads.most_common()),
        "",
        "| thread (operating system) | CPU, cores |",
        "|---|---|",
        *(
            f"| {name} | {cpu:.2f} |"
            for name, cpu in sorted(profile.thread_cpu.items(), key=lambda item: -item[1])
        ),
        "",
        "| function (own time) | share |",
        "|---|---|",
        *(f"| `{name}` | {count / samples:.1%} |" for name, count in profile.own.most_common(TOP)),
        "",
        "| project function (total time, callees included) | share |",
        "|---|---|",
        *(f"| `{name}` | {count / samples:.1%} |" for name, count in profile.total.most_common(TOP)),
        "",
    ]
    return lines
