"""Per-sample norms and clipping under torch.vmap (DP-SGD), against torch.

    python -m fastclip.benchmark.per_sample [--sets small,medium,large] [--device cpu] [--out DIR]

Each set is a batch of per-sample gradients (one tensor per parameter, the
batch first, as ``torch.vmap(torch.func.grad(...))`` returns them). Timed,
each under ``torch.vmap`` over the samples:

  norm  ``get_total_norm`` of one sample's gradients
  clip  ``clip_grad_norm_`` of one sample's gradients, each set as the
        ``.grad`` of a detached alias of itself (in place: the gradients
        are restored from a copy before each call, outside the timed
        window; Parameters and clones made per call would time the
        allocator, whose page faults varied 3x from run to run)

for fastclip and for torch's ``foreach=False`` path (torch's foreach ops
have no batching rules). Every method's per-sample norms and clipped
gradients are checked against float64 before anything is timed.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from .report import save_result
from .timing import Timer

# Per-sample gradient shapes: a small MLP with odd sizes, a wider one, and
# a model of 2.4M parameters (9.4 MB per fp32 sample).
SETS = {
    "small": (256, [(64, 48), (48,), (48, 48), (7,), (32, 16), (16,), (100,), (5, 5), (48, 32), (32,), (9, 3), (3,)]),
    "medium": (64, [(256, 96), (96,), (96, 96), (96,), (128, 64), (64,), (400,), (10, 10), (96, 64), (64,),
                    (33, 9), (9,)]),
    "large": (32, [(1024, 1024), (1024,), (1024, 512), (512,), (512, 1024), (1024,), (256, 1024), (256,)]),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_NORM = 1.0
ROUNDS = 3
NORM_RTOL = 1e-6  # DESIGN.md: the float32 total norm against float64
TORCH_NORM_RTOL = 1e-5  # torch sums in float32 (and rounds a 16-bit norm to its dtype: see _check)


def _per_sample_grads(samples: int, shapes, dtype, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn((samples, *s), generator=gen).to(device=device, dtype=dtype) for s in shapes]


def _methods(module, **kwargs):
    """(norm, clip) of one sample's gradients with ``module``'s functions."""
    def norm(*grads):
        return module.get_total_norm(list(grads), **kwargs)

    def clip(*grads):
        params = [g.detach() for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        module.clip_grad_norm_(params, MAX_NORM, **kwargs)
        return tuple(p.grad for p in params)

    return torch.vmap(norm), torch.vmap(clip)


def _check(grads: list[torch.Tensor], methods: dict) -> None:
    """Every method's per-sample norms and clipped gradients against
    float64, before any timing: a wrong result is never timed."""
    expected = torch.stack([g.double().flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
    coef = (MAX_NORM / (expected + 1e-6)).clamp(max=1.0)
    for name, (norm, clip) in methods.items():
        # torch's float32 sums are off by up to ~1e-6 on these sets, and its
        # coefficient with them; fastclip's norm is float64 rounded once.
        eps = torch.finfo(grads[0].dtype).eps
        norm_rtol = NORM_RTOL if name == "fastclip" else max(TORCH_NORM_RTOL, eps)
        error = ((norm(*grads).double() - expected).abs() / expected).max().item()
        if not error <= norm_rtol:
            raise RuntimeError(f"{name}: per-sample norm off the float64 reference by {error:.2e} relative")
        rtol = 2 * eps + (0.0 if name == "fastclip" else 2 * norm_rtol)
        for g, out in zip(grads, clip(*[g.clone() for g in grads])):
            want = g.double() * coef.view(-1, *[1] * (g.dim() - 1))
            error = ((out.double() - want).abs() / want.abs()).nan_to_num(0.0).max().item()
            if not error <= rtol:
                raise RuntimeError(f"{name}: clipped gradients off the float64 reference by {error:.2e} relative")


def run(sets: list[str], dtype: torch.dtype, device: torch.device, rounds: int = ROUNDS) -> dict:
    import fastclip

    methods = {"fastclip": _methods(fastclip), "torch": _methods(torch.nn.utils, foreach=False)}
    timer = Timer(device, warmup=2, min_repeats=10, max_repeats=50, target_s=0.5)
    rows = []
    for name in sets:
        samples, shapes = SETS[name]
        grads = _per_sample_grads(samples, shapes, dtype, device)
        _check(grads, methods)
        work = [g.clone() for g in grads]  # what the clip writes

        def restore():
            for w, g in zip(work, grads):
                w.copy_(g)

        best = {(m, op): math.inf for m in methods for op in ("norm", "clip")}
        for _ in range(rounds):  # methods alternate; each keeps its best median
            for m, (norm, clip) in methods.items():
                best[(m, "norm")] = min(best[(m, "norm")], timer(lambda: norm(*grads)).median)
                best[(m, "clip")] = min(best[(m, "clip")], timer(lambda: clip(*work), before=restore).median)
        rows.append({
            "set": name, "samples": samples, "tensors": len(shapes),
            "mbytes": sum(g.numel() * g.element_size() for g in grads) / 1e6,
            **{f"{m}_{op}_ms": v for (m, op), v in best.items()},
        })
    return {"dtype": str(dtype).replace("torch.", ""), "device": str(device), "threads": torch.get_num_threads(),
            "rounds": rounds, "torch": torch.__version__, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastclip.benchmark.per_sample",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds over the methods ({ROUNDS})")
    parser.add_argument("--out", help="directory for per_sample.json")
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in SETS]
    if unknown or not sets:
        parser.error(f"--sets: unknown {unknown}; choose from {', '.join(SETS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    result = run(sets, DTYPES[args.dtype], torch.device(args.device), args.rounds)
    print(f"per-sample gradients under torch.vmap, {result['dtype']} on {result['device']}, "
          f"{result['threads']} threads, torch {result['torch']}; best median of {result['rounds']} rounds, ms")
    print("| set | samples x tensors | MB | norm fastclip | norm torch | clip fastclip | clip torch |\n"
          "|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['set']} | {r['samples']} x {r['tensors']} | {r['mbytes']:.1f} | {r['fastclip_norm_ms']:.2f} | "
              f"{r['torch_norm_ms']:.2f} | {r['fastclip_clip_ms']:.2f} | {r['torch_clip_ms']:.2f} |")
    if args.out:
        save_result(args.out, "per_sample.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
