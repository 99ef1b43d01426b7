"""What the benchmark sections share: timing statistics, peak-memory probes
in child processes, Markdown tables and the document header.

Every timed figure is reported as the median of several runs with its
min–max; variants are interleaved (one call of each per round) so that load
from other processes on a shared machine hits them alike, and ratios are
computed from those same runs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
# The examples' shared helpers (data, training loops, plots) are reused, not copied.
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each blocking thunk, ``repeats`` rounds of one call
    of each (after ``warmup`` untimed rounds), so that machine noise hits all
    variants alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios: both variants of a round ran back to back,
    so slow drifts of the machine cancel out."""
    return med([a / b for a, b in zip(num, den)])


def ms(xs: Sequence[float], digits: int = 2) -> str:
    """'12.34 (11.90–13.02)': median and min–max in milliseconds."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(1e3 * med(xs))} ({f.format(1e3 * min(xs))}–{f.format(1e3 * max(xs))})"


def secs(xs: Sequence[float], digits: int = 3) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(med(xs))} ({f.format(min(xs))}–{f.format(max(xs))})"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB. XLA's buffers
    live outside Python's allocator, so ``tracemalloc`` would miss them."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def child(argv: Sequence[str], timeout: float = 900) -> dict:
    """Runs ``python argv...`` in a fresh process (so that memory peaks of
    different measurements never mix) and returns the JSON object it prints
    on its last stdout line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, check=True).stdout.strip()
        # The generated document and plots themselves do not count as changes.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!BENCHMARKS.md", ":!benchmark_plots"],
                               capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def environment() -> dict[str, str]:
    """Machine, CPU count, library versions, date and git commit."""
    import flax
    import jax
    import numpy
    import optax
    try:
        import orbax.checkpoint as ocp
        orbax = ocp.__version__
    except Exception:  # noqa: BLE001 -- optional for the header
        orbax = "not installed"
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "machine": f"{platform.node()} ({platform.platform()})",
        "CPU": cpu_model(),
        "CPU count": str(os.cpu_count()),
        "load average at start (1, 5, 15 min)": load,
        "python": platform.python_version(),
        "jax / jaxlib": f"{jax.__version__} / {__import__('jaxlib').__version__}",
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax,
        "numpy": numpy.__version__,
        "devices": ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()})),
        "date": now(),
        "git commit": git_commit(),
    }


def save_figure(fig: Any, out_dir: Path, name: str) -> str:
    """Saves ``fig`` as ``out_dir/name`` and returns the relative Markdown link."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return name


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
