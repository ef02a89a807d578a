"""fastclip benchmark: fastclip against torch.nn.utils.clip_grad_norm_, side by side.

    python -m fastclip.benchmark [--sets gpt2-124m,10k-small] [--dtypes fp32,bf16] [--quick] [--out DIR]

For each parameter list (real architectures' shapes) and gradient dtype it
times, in one process: torch's clip_grad_norm_ with foreach=True and with
foreach=False, and fastclip.clip_grad_norm_, in two cases:
  clip   the norm is above max_norm: every gradient is rescaled;
  noclip the norm is below max_norm: the gradients stay as they are.
Each method's result is checked against a float64 reference before it is
timed. Timing: warm-up calls, then the median (and min/max) of repeated
calls, perf_counter on the CPU and CUDA events on a GPU.

The floor is measured in the same run on one float32 buffer with the same
byte count as the gradients: one read pass (sum) plus one in-place multiply
for "clip", the read pass alone for "noclip". It is what memory allows for
the work a clip must do; "x floor" is a method's time over it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import fastclip

from .shapes import SETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_NORM_CLIP = 1.0  # gradients are built with a norm far above this
MAX_NORM_NOCLIP = 1e30


@dataclass
class Row:
    set: str
    dtype: str
    case: str
    method: str
    tensors: int
    mbytes: float
    median_ms: float
    min_ms: float
    max_ms: float
    speedup_vs_torch: float
    x_floor: float
    norm_rel_err: float  # |returned - float64 norm| / float64 norm


class Timer:
    """Median-of-repeats timing of a callable on one device."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            times = []
            for _ in range(self.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return times
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times


def make_params(shapes, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters with gradients of uniform(-1, 1) values (norm far above MAX_NORM_CLIP).

    The parameter storage itself is never touched (torch.empty), so only the
    gradients take memory.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        p.grad = torch.empty(shape, dtype=dtype, device=device).uniform_(-1.0, 1.0, generator=gen)
        params.append(p)
    return params


def ref_norm(params) -> float:
    """float64 norm of the gradients as stored."""
    return math.sqrt(sum(torch.linalg.vector_norm(p.grad, dtype=torch.float64).item() ** 2 for p in params))


def check_method(name: str, fn, params, max_norm: float) -> float:
    """One call on the current gradients, checked against float64 before any
    timing; returns the relative error of the returned norm."""
    before = ref_norm(params)
    returned = float(fn(params, max_norm))
    error = abs(returned - before) / before
    # fastclip accumulates in float64. torch accumulates fp32 in fp32 (errors
    # up to ~1e-3 on these sizes) and rounds bf16/fp16 norms to that dtype.
    tol = 1e-6 if name.startswith("fastclip") else 2e-2
    if not error <= tol:
        raise AssertionError(f"{name}: returned norm {returned} but the float64 norm is {before}")
    after = ref_norm(params)
    expected = min(before, max_norm)
    if not math.isclose(after, expected, rel_tol=1e-2):
        raise AssertionError(f"{name}: norm after clipping is {after}, expected {expected}")
    return error


METHODS = {
    "torch foreach": lambda params, max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True),
    "torch loop": lambda params, max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False),
    "fastclip": lambda params, max_norm: fastclip.clip_grad_norm_(params, max_norm),
}


def measure_floor(nbytes: int, device: torch.device, timer: Timer) -> dict[str, float]:
    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_(-1.0, 1.0)
    read = statistics.median(timer(lambda: buf.sum()))
    both = statistics.median(timer(lambda: (buf.sum(), buf.mul_(0.9999999))))
    del buf
    return {"clip": both, "noclip": read}


def run_set(set_name: str, dtype_name: str, device: torch.device, timer: Timer, log) -> list[Row]:
    shapes = SETS[set_name]()
    params = make_params(shapes, DTYPES[dtype_name], device)
    nbytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    floor = measure_floor(nbytes, device, timer)
    rows: list[Row] = []
    for case, max_norm in (("clip", MAX_NORM_CLIP), ("noclip", MAX_NORM_NOCLIP)):
        times: dict[str, list[float]] = {}
        errors: dict[str, float] = {}
        for name, fn in METHODS.items():
            errors[name] = check_method(name, fn, params, max_norm)
            times[name] = timer(lambda fn=fn: fn(params, max_norm))
            log(".")
        base = statistics.median(times["torch foreach"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(
                Row(set_name, dtype_name, case, name, len(shapes), nbytes / 1e6, med, min(ts), max(ts),
                    base / med, med / floor[case], errors[name])
            )
        rows.append(
            Row(set_name, dtype_name, case, "floor", len(shapes), nbytes / 1e6, floor[case], floor[case],
                floor[case], base / floor[case], 1.0, 0.0)
        )
    return rows


def environment(device: torch.device) -> dict:
    env = {
        "fastclip": fastclip.__version__,
        "backend": fastclip.backend(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def format_table(rows: list[Row]) -> str:
    header = f"{'set':<11} {'dtype':<5} {'case':<6} {'method':<14} {'ms':>9} {'min..max ms':>17} {'vs torch':>8} {'x floor':>7} {'norm err':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        spread = f"{r.min_ms:.2f}..{r.max_ms:.2f}"
        lines.append(
            f"{r.set:<11} {r.dtype:<5} {r.case:<6} {r.method:<14} {r.median_ms:9.2f} {spread:>17} "
            f"{r.speedup_vs_torch:7.2f}x {r.x_floor:6.2f}x {r.norm_rel_err:8.1e}"
        )
    return "\n".join(lines)


def write_outputs(rows: list[Row], env: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=2)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastclip.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sets only, fewer repeats")
    parser.add_argument("--out", default=None, help="directory for results.csv and results.json")
    args = parser.parse_args(argv)

    sets = [s for s in args.sets.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for s in sets:
        if s not in SETS:
            parser.error(f"unknown set {s!r}; choose from {', '.join(SETS)}")
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    repeats, warmup = args.repeats, args.warmup
    if args.quick:
        sets = [s for s in sets if s != "llama-1.2b"]
        repeats, warmup = min(repeats, 3), 1

    device = torch.device(args.device)
    timer = Timer(device, warmup, repeats)
    env = environment(device)
    print("fastclip benchmark:", ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows: list[Row] = []
    with torch.no_grad():
        for set_name in sets:
            for dtype_name in dtypes:
                print(f"  {set_name} {dtype_name} ", end="", flush=True)
                rows += run_set(set_name, dtype_name, device, timer, lambda s: print(s, end="", flush=True))
                print(" done", flush=True)
    print()
    print(format_table(rows))
    if args.out:
        write_outputs(rows, env, args.out)
        print(f"\nwrote {args.out}/results.csv and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
