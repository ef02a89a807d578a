"""Distributed clip on CPU processes (gloo): fastclip against torch on the same DTensor shards.

    python -m fastclip.benchmark.distributed [--world 2] [--sets gpt2-124m,10k-small]
        [--layout shard|sequence-parallel] [--out DIR]

Every rank holds FSDP2-style gradients: each tensor of a set's shape list is
a DTensor sharded on dim 0 over a 1-D mesh of all ranks. With
``--layout sequence-parallel`` the 1-D tensors (norm weights, biases) are
``Partial(sum)`` instead, each rank holding a summand of the whole tensor,
as tensor parallelism with SequenceParallel leaves a LayerNorm's gradients
(torch's norm all-reduces each such tensor; fastclip all of them in one
collective). Timed on rank 0,
after a barrier, with perf_counter; the gradients are restored from a copy
before every call (outside the timed region) so that every call clips:

  torch     torch.nn.utils.clip_grad_norm_ on the DTensor grads (foreach)
  fastclip  fastclip.clip_grad_norm_ on the same DTensor grads
  local     fastclip.clip_grad_norm_ on this rank's local shards alone
            (no communication: what one process would pay)
  allreduce one all_reduce of one float64 scalar over the mesh

fastclip's cost over "local" should be about one "allreduce" (the design:
one fused local pass, then one all_reduce of one scalar per mesh dimension).
Results are checked before timing: fastclip's norm against a float64
reference of the full gradients.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

from .cases import NORM_RTOL
from .report import save_result

DEFAULT_SETS = ("gpt2-124m", "10k-small")
LAYOUTS = ("shard", "sequence-parallel")
MAX_NORM = 1.0
METHODS = ("torch", "fastclip", "local", "allreduce")


def _local_rows(rows: int, world: int, rank: int) -> int:
    """Rows of dim 0 on ``rank`` when torch.chunk splits ``rows`` over ``world`` (DTensor Shard(0))."""
    per = -(-rows // world)
    return max(0, min(per, rows - per * rank))


def _pending(shape, layout: str) -> bool:
    """The tensor is a Partial(sum) summand in this layout."""
    return layout == "sequence-parallel" and len(shape) == 1


def _grads(shapes, mesh, rank: int, world: int, seed: int, layout: str = "shard"):
    from torch.distributed.tensor import DTensor, Partial, Shard

    g = torch.Generator().manual_seed(seed + rank)
    out = []
    for shape in shapes:
        stride = torch.empty(shape, device="meta").stride()
        if _pending(shape, layout):
            local = torch.randn(shape, generator=g) * 10.0
            placement = Partial("sum")
        else:
            local_shape = (_local_rows(shape[0], world, rank),) + tuple(shape[1:])
            local = torch.randn(local_shape, generator=g) * 10.0
            placement = Shard(0)
        out.append(DTensor.from_local(local, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride))
    return out


def _time_rounds(calls: dict, repeats: int, warmup: int) -> dict:
    """ms per call of each method, timed in rounds (one call of each method
    per round), so that all see the same drifting machine: timed one after
    the other, minutes apart, their medians differed by up to 5 ms on
    GPT-2. Each call starts from restored gradients, behind a barrier."""
    import torch.distributed as dist

    times: dict = {m: [] for m in calls}
    for i in range(warmup + repeats):
        for method, (fn, restore) in calls.items():
            restore()
            dist.barrier()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[method].append(elapsed * 1e3)
    return times


def _worker(rank: int, world: int, init_file: str, sets: list, repeats: int, warmup: int, result_file: str,
            layout: str = "shard") -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import fastclip

    from .shapes import SETS

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    try:
        for name in sets:
            shapes = SETS[name]()
            grads = _grads(shapes, mesh, rank, world, seed=17, layout=layout)
            saved = [g.to_local().clone() for g in grads]
            params = []
            for g in grads:
                p = torch.nn.Parameter(torch.zeros_like(g))
                p.grad = g
                params.append(p)

            def restore():
                for g, s in zip(grads, saved):
                    g.to_local().copy_(s)

            sharded = [s for s, shape in zip(saved, shapes) if not _pending(shape, layout)]
            local_sq = torch.stack([s.double().pow(2).sum() for s in sharded] + [torch.zeros((), dtype=torch.float64)]).sum()
            dist.all_reduce(local_sq)
            for s, shape in zip(saved, shapes):  # a summand's whole tensor, in float64, counted once
                if _pending(shape, layout):
                    whole = s.double()
                    dist.all_reduce(whole)
                    local_sq += whole.pow(2).sum()
            expected = math.sqrt(float(local_sq))
            restore()
            got = float(fastclip.clip_grad_norm_(params, MAX_NORM).full_tensor())
            if not math.isclose(got, expected, rel_tol=NORM_RTOL["fastclip"]):
                raise AssertionError(f"{name}: fastclip norm {got} vs float64 {expected}")
            # The shards as clipped, not only the norm returned (found in
            # review): every element its saved value times the coefficient
            # of the global norm, rounded once.
            coef = min(1.0, MAX_NORM / (expected + 1e-6))
            for g, s in zip(grads, saved):
                want = s.double() * coef
                worst = float(((g.to_local().double() - want).abs() / want.abs().clamp_min(1e-30)).max()) if s.numel() else 0.0
                if not worst <= NORM_RTOL["fastclip"] + torch.finfo(s.dtype).eps:
                    raise AssertionError(f"{name}: a clipped shard element is off by {worst:.2e} relative")
            restore()
            ref = float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM).full_tensor())
            if not math.isclose(ref, expected, rel_tol=NORM_RTOL["torch"]):
                raise AssertionError(f"{name}: torch norm {ref} vs float64 {expected}")
            scalar = torch.zeros((), dtype=torch.float64)
            local_params = []
            for s in saved:
                p = torch.nn.Parameter(torch.zeros_like(s))
                p.grad = s.clone()
                local_params.append(p)

            def restore_local():
                for p, s in zip(local_params, saved):
                    p.grad.copy_(s)

            calls = {
                "torch": (lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM), restore),
                "fastclip": (lambda: fastclip.clip_grad_norm_(params, MAX_NORM), restore),
                "local": (lambda: fastclip.clip_grad_norm_(local_params, MAX_NORM), restore_local),
                "allreduce": (lambda: dist.all_reduce(scalar), lambda: None),
            }
            timings = _time_rounds(calls, repeats, warmup)
            if rank == 0:
                row = {
                    "set": name,
                    "layout": layout,
                    "tensors": len(shapes),
                    "partial_tensors": sum(_pending(shape, layout) for shape in shapes),
                    "mbytes_per_rank": sum(s.numel() * s.element_size() for s in saved) / 1e6,
                    "norm_rel_err_torch": abs(ref - expected) / expected,
                    "norm_rel_err_fastclip": abs(got - expected) / expected,
                }
                for m, t in timings.items():
                    row[f"{m}_median_ms"] = statistics.median(t)
                    row[f"{m}_min_ms"] = min(t)
                rows.append(row)
            del grads, saved, params, local_params
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        del mesh
        gc.collect()  # DTensors and the mesh hold the groups: release them before the teardown
        dist.destroy_process_group()
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(rows, f)


def run(world: int, sets: list, repeats: int, warmup: int, layout: str = "shard") -> list[dict]:
    """Spawn ``world`` gloo processes and return rank 0's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rows.json")
        torch.multiprocessing.spawn(
            _worker, args=(world, os.path.join(tmp, "rendezvous"), sets, repeats, warmup, result, layout), nprocs=world
        )
        with open(result) as f:
            return json.load(f)


def table(rows: list[dict], world: int) -> str:
    layout = rows[0].get("layout", "shard") if rows else "shard"
    what = "Shard(0)" if layout == "shard" else "Shard(0), 1-D ones Partial(sum)"
    lines = [
        f"distributed clip, {world} CPU processes (gloo), DTensor {what} gradients; ms, median of repeats",
        f"{'set':12} {'tensors':>7} {'MB/rank':>8} {'torch':>9} {'fastclip':>9} {'local':>8} {'allreduce':>9} {'speedup':>8} {'extra/allreduce':>15}",
    ]
    for r in rows:
        extra = (r["fastclip_median_ms"] - r["local_median_ms"]) / max(r["allreduce_median_ms"], 1e-9)
        lines.append(
            f"{r['set']:12} {r['tensors']:>7} {r['mbytes_per_rank']:>8.1f} {r['torch_median_ms']:>9.2f} "
            f"{r['fastclip_median_ms']:>9.2f} {r['local_median_ms']:>8.2f} {r['allreduce_median_ms']:>9.3f} "
            f"{r['torch_median_ms'] / r['fastclip_median_ms']:>7.1f}x {extra:>15.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from .shapes import SETS

    parser = argparse.ArgumentParser(prog="python -m fastclip.benchmark.distributed", description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2, help="number of CPU processes (default 2)")
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS), help=f"comma-separated, from {', '.join(SETS)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layout", choices=LAYOUTS, default="shard",
                        help="shard: every tensor Shard(0) (FSDP2); sequence-parallel: 1-D tensors Partial(sum)")
    parser.add_argument("--out", default=None, help="directory for distributed.json")
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        parser.error(f"--sets: unknown set(s) {', '.join(unknown)}; known: {', '.join(SETS)}")
    if args.world < 2:
        parser.error(f"--world must be at least 2, got {args.world}")
    rows = run(args.world, sets, args.repeats, args.warmup, args.layout)
    print(table(rows, args.world))
    if args.out:
        save_result(args.out, "distributed.json",
                    {"world": args.world, "layout": args.layout, "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
