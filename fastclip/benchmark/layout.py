"""What the memory layout of many small tensors costs, on the CPU.

    python -m fastclip.benchmark.layout [--count 10000] [--dtype fp32] [--out DIR]

The benchmark's floor for a list is one buffer of the same bytes. A list of
10,000 small gradients is not one buffer: each tensor is its own allocation,
and between two gradients of a model there is usually other memory (its
parameter, freed activations). This times fastclip's norm and clip, the same
code on the same bytes and the same number of tensors, over four layouts:

  flat         one tensor of all the elements (the floor's layout)
  views        the list as contiguous views of that one buffer
  separate     each tensor allocated on its own, back to back
  interleaved  each gradient allocated right after a parameter of its size
               (how the benchmark's lists and a model's .grad fields lie)

and torch's own ``sum`` (read) and ``sum`` + ``mul_`` (read + scale) on the
flat buffer, the benchmark's floor. Every layout holds the same values, and
its norm is checked against float64 before anything is timed. The gap between "views" and "flat" is
the per-tensor cost of the kernels and the host; the gap between
"interleaved" and "views" is the memory system's: hardware prefetchers
follow one stream, and each gradient that starts a page away from the last
one restarts it.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from . import shapes as shape_lists
from .report import save_result

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPEATS = 15
ROUNDS = 3
# A coefficient below 1, so that every scale pass writes; 16 repeats move
# the values by 2e-5 relative, nowhere near subnormals.
COEF = 1.0 - 2.0**-20


def _median_ms(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _layouts(numels: list[int], dtype: torch.dtype) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """The same values in each layout, and the parameters that sit between
    the interleaved gradients (to be kept alive)."""
    gen = torch.Generator().manual_seed(0)
    flat = torch.empty(sum(numels), dtype=dtype).uniform_(-1.0, 1.0, generator=gen)
    views = list(flat.split(numels))
    separate = [v.clone() for v in views]
    interleaved, params = [], []
    for v in views:
        params.append(torch.zeros_like(v))  # the parameter right before its gradient
        interleaved.append(v.clone())
    return {"flat": [flat], "views": views, "separate": separate, "interleaved": interleaved}, params


def run(count: int, dtype: torch.dtype, rounds: int = ROUNDS) -> dict:
    from fastclip import _ops

    numels = [s[0] for s in shape_lists.small_tensors(count)]
    lists, _params = _layouts(numels, dtype)
    flat = lists["flat"][0]
    reference = flat.double().norm().item()
    for name, tensors in lists.items():  # correct before timed: one value in every layout
        norm = _ops.multi_tensor_norm(tensors, 2.0, False)[0].item()
        if abs(norm - reference) > 1e-6 * reference:
            raise RuntimeError(f"layout {name}: norm {norm} differs from the float64 reference {reference}")
    coef = torch.tensor(COEF)
    calls = {name: (lambda ts=tensors: _ops.multi_tensor_norm(ts, 2.0, False),
                    # the clip's two passes: the norm, then a scale that writes
                    lambda ts=tensors: (_ops.multi_tensor_norm(ts, 2.0, False), _ops.multi_tensor_scale_(ts, coef)))
             for name, tensors in lists.items()}
    calls["torch floor (flat)"] = (lambda: flat.sum(), lambda: (flat.sum(), flat.mul_(COEF)))
    # Rounds over all layouts, keeping each layout's best median: a burst of
    # noise on a shared machine then hits one round, not one layout.
    rows = {name: {"norm_ms": math.inf, "clip_ms": math.inf} for name in calls}
    for _ in range(rounds):
        for name, (norm, clip) in calls.items():
            rows[name]["norm_ms"] = min(rows[name]["norm_ms"], _median_ms(norm))
            rows[name]["clip_ms"] = min(rows[name]["clip_ms"], _median_ms(clip))
    return {
        "count": count,
        "dtype": str(dtype).replace("torch.", ""),
        "mbytes": sum(numels) * flat.element_size() / 1e6,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "torch": torch.__version__,
        "rows": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastclip.benchmark.layout", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="tensors in the list (10000)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds over all layouts ({ROUNDS})")
    parser.add_argument("--out", help="directory for layout.json")
    args = parser.parse_args(argv)
    if args.count < 1 or args.rounds < 1:
        parser.error("--count and --rounds must be at least 1")
    result = run(args.count, DTYPES[args.dtype], args.rounds)
    base = result["rows"]["torch floor (flat)"]
    print(f"{result['count']} tensors of 64..4096 elements, {result['dtype']}, {result['mbytes']:.0f} MB, "
          f"{result['threads']} threads, torch {result['torch']}; best median of {result['rounds']} rounds, ms (x the floor)")
    print("| layout | norm | norm + scale |\n|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['norm_ms']:.2f} ({row['norm_ms'] / base['norm_ms']:.2f}x) "
              f"| {row['clip_ms']:.2f} ({row['clip_ms'] / base['clip_ms']:.2f}x) |")
    if args.out:
        save_result(args.out, "layout.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
