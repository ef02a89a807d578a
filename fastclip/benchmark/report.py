"""Results: the row type, the environment, the terminal table, CSV/JSON, the chart, progress."""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Optional, TextIO

import torch

import fastclip

OK = "ok"
CHART_NAME = "benchmark.png"
# Width of the progress bar in characters.
BAR_WIDTH = 28


@dataclass
class Row:
    """One method on one list in one case (or that case's floor).

    status is "ok", or "failed: why", "unavailable: why", "skipped: why";
    the numbers are None unless it is "ok". Times are milliseconds per call.
    """

    set: str
    dtype: str
    case: str
    method: str
    status: str
    tensors: int
    mbytes: float
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    repeats: Optional[int] = None
    speedup_vs_torch: Optional[float] = None  # median of the case's torch baseline / this median
    x_floor: Optional[float] = None  # this median / floor_ms
    floor_ms: Optional[float] = None  # the floor this row is compared with (CPU: timed alongside it)
    host_overhead_ms: Optional[float] = None
    norm_rel_err: Optional[float] = None  # |returned norm - float64 norm| / float64 norm
    note: str = ""


COLUMNS = [f.name for f in fields(Row)]
NUMBERS = [
    "median_ms", "min_ms", "max_ms", "repeats", "speedup_vs_torch", "x_floor", "floor_ms", "host_overhead_ms",
    "norm_rel_err",
]


# -------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """The commit of the fastclip checkout that is running, "-dirty" when it
    has uncommitted changes; None outside a fastclip checkout (an installed
    package inside another project's repository is not one: found in
    review, its commit was reported)."""
    package = os.path.dirname(os.path.abspath(fastclip.__file__))
    where = os.path.dirname(package)
    if not os.path.isfile(os.path.join(where, "setup.py")):
        return None
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=where, capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or not os.path.samefile(top.stdout.strip(), where):
            return None
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_prefetch() -> Optional[str]:
    """How the CPU kernels prefetch (it moves the CPU rows; see the README's Design)."""
    info = fastclip.build_info()
    if "cpu_prefetch" not in info:
        return None  # no extension loaded
    return f"{info['cpu_prefetch']} (decided by {info['cpu_prefetch_decided_by']})"


def environment(device: torch.device, argv: list[str]) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_model()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m fastclip.benchmark", *argv]),
        "device": device.type,
        "device_name": device_name,
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "fastclip": fastclip.__version__,
        "fastclip_backend": fastclip.backend(),
        "cpu_prefetch": _cpu_prefetch(),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -------------------------------------------------------------------- table
def _num(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'set':<17} {'dtype':<5} {'case':<10} {'method':<19} {'ms':>8} {'min..max ms':>15} {'vs torch':>8} "
        f"{'x floor':>7} {'host ms':>8} {'norm err':>8}  note"
    )
    lines = [header, "-" * len(header)]
    previous = None
    for r in rows:
        group = (r.set, r.dtype, r.case)
        name = group if group != previous else ("", "", "")
        previous = group
        if r.status == OK:
            cells = (
                f"{_ms(r.median_ms):>8} {_ms(r.min_ms) + '..' + _ms(r.max_ms):>15} "
                f"{_num(r.speedup_vs_torch, '.2f') + 'x':>8} {_num(r.x_floor, '.2f') + 'x':>7} "
                f"{_ms(r.host_overhead_ms):>8} {_num(r.norm_rel_err, '.1e'):>8}  {r.note}"
            )
        else:
            cells = r.status
        lines.append(f"{name[0]:<17} {name[1]:<5} {name[2]:<10} {r.method:<19} {cells}".rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ outputs
def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def save_result(directory: str, filename: str, data: dict) -> None:
    """A diagnostic's result as ``directory/filename`` (the directory made if needed)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, filename), "w") as f:
        json.dump(data, f, indent=1)


def write_json(rows: list[Row], env: dict, settings: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "settings": settings, "rows": [asdict(r) for r in rows]}, f, indent=2)


# Columns of the summary's first table: fastclip's method in each case.
SUMMARY_COLUMNS = [
    ("norm", "fastclip"),
    ("per-tensor", "fastclip"),
    ("noclip", "fastclip"),
    ("clip", "fastclip"),
    ("adamw", "fastclip+adamw"),
    ("adamw", "ClippedOptimizer"),
    ("adamw-noclip", "ClippedOptimizer"),
]
# Methods of the summary's second table (the clip case), in ms.
SUMMARY_CLIP_METHODS = ["torch foreach", "torch loop", "torch compile", "fastclip", "fastclip op", "floor"]


def _cell(row: Optional[Row], text: str) -> str:
    """``text`` for a timed row, else the first word of its status."""
    if row is None:
        return ""
    return text if row.status == OK else row.status.split(":")[0]


def _versus(row: Optional[Row]) -> str:
    if row is None or row.status != OK:
        return _cell(row, "")
    return f"{_num(row.speedup_vs_torch, '.2f')}x ({_num(row.x_floor, '.2f')}x)"


def summary_markdown(rows: list[Row]) -> str:
    """Two Markdown tables: fastclip against torch foreach in every case, and the clip case in ms."""
    index = {(r.set, r.dtype, r.case, r.method): r for r in rows}
    lists = list(dict.fromkeys((r.set, r.dtype, r.tensors, r.mbytes) for r in rows))
    out = [
        "fastclip's speedup over torch foreach (its time over the floor):",
        "",
        "| list | dtype | " + " | ".join(f"{case}: {method}" for case, method in SUMMARY_COLUMNS) + " |",
        "|---" * (2 + len(SUMMARY_COLUMNS)) + "|",
    ]
    for name, dtype, tensors, mbytes in lists:
        cells = [_versus(index.get((name, dtype, case, method))) for case, method in SUMMARY_COLUMNS]
        out.append(f"| {name}, {tensors} tensors ({mbytes:.0f} MB) | {dtype} | {' | '.join(cells)} |")
    out += [
        "",
        "clip (norm above max_norm), ms per call; host overhead (ms) and norm error of torch foreach / fastclip:",
        "",
        "| list | dtype | " + " | ".join(SUMMARY_CLIP_METHODS) + " | host overhead | norm error |",
        "|---" * (4 + len(SUMMARY_CLIP_METHODS)) + "|",
    ]
    for name, dtype, _, _ in lists:
        clip = {m: index.get((name, dtype, "clip", m)) for m in SUMMARY_CLIP_METHODS}
        times = [_cell(r, _ms(r.median_ms) if r else "") for r in clip.values()]
        pair = (clip["torch foreach"], clip["fastclip"])
        host = " / ".join(_cell(r, _ms(r.host_overhead_ms) if r else "") for r in pair)
        error = " / ".join(_cell(r, _num(r.norm_rel_err, ".1e") if r else "") for r in pair)
        out.append(f"| {name} | {dtype} | {' | '.join(times)} | {host} | {error} |")
    return "\n".join(out) + "\n"


def write_chart(rows: list[Row], env: dict, path: str) -> Optional[str]:
    """Speedup over torch foreach and time over the floor, one pair of panels
    per case, bars grouped by list. Returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return "matplotlib is not installed (pip install fastclip[bench])"
    timed = [r for r in rows if r.status == OK and r.method != "floor" and r.speedup_vs_torch is not None]
    cases = list(dict.fromkeys(r.case for r in timed))
    if not cases:
        return "no timed rows"
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r.method for r in timed))}
    fig, axes = plt.subplots(len(cases), 2, figsize=(16, 3.2 * len(cases) + 0.6), squeeze=False)
    for row_axes, case in zip(axes, cases):
        in_case = [r for r in timed if r.case == case]
        groups = list(dict.fromkeys((r.set, r.dtype) for r in in_case))
        methods = list(dict.fromkeys(r.method for r in in_case))
        width = 0.8 / len(methods)
        panels = (("speedup_vs_torch", "speedup over torch foreach"), ("x_floor", "time / floor (1 = memory-bound)"))
        for ax, (metric, title) in zip(row_axes, panels):
            for k, method in enumerate(methods):
                # A row timed next to a failed floor has a speedup but no ratio to the floor.
                values = {(r.set, r.dtype): getattr(r, metric) for r in in_case
                          if r.method == method and getattr(r, metric) is not None}
                xs = [i + (k - (len(methods) - 1) / 2) * width for i, g in enumerate(groups) if g in values]
                heights = [values[g] for g in groups if g in values]
                ax.bar(xs, heights, width, label=method, color=colors[method])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            low, high = ax.get_ylim()
            # Less than a decade shows no labelled major tick but 1x: label the minor ones.
            ax.yaxis.set_minor_formatter(ax.yaxis.get_major_formatter() if high / low < 10 else NullFormatter())
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{s} {d}" for s, d in groups], fontsize=7, rotation=25, ha="right")
            ax.set_title(f"{case}: {title}", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
        row_axes[0].legend(fontsize=7, ncol=len(methods))
    fig.suptitle(
        f"fastclip {env['fastclip']} on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
        f"{env['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return None


# ----------------------------------------------------------------- progress
class Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal,
    one line per list otherwise (logs stay readable)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()
        self.tty = stream.isatty()
        self._last_group: Optional[str] = None

    def advance(self, group: str, detail: str) -> None:
        """Start step ``done + 1`` of ``total``: ``detail`` of list ``group``."""
        self.done += 1
        elapsed = time.perf_counter() - self.start
        filled = BAR_WIDTH * (self.done - 1) // max(self.total, 1)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s  {group} {detail}"
        if self.tty:
            self.stream.write("\r" + line[:119].ljust(119))
        elif group != self._last_group:
            self.stream.write(line + "\n")
        self._last_group = group
        self.stream.flush()

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        prefix = "\r" if self.tty else ""
        self.stream.write(f"{prefix}[{'#' * BAR_WIDTH}] {self.total}/{self.total} {elapsed:5.0f}s  done".ljust(119) + "\n")
        self.stream.flush()
