"""Negative controls for tests/test_cuda_emulated.py: plants one bug at a
time in a copy of the CUDA kernel source, runs the emulated tests against it
(FASTCLIP_CUDA_EMULATOR_SOURCE) and prints whether they caught it. Every
mutant must be caught: tests that fail, or a test process killed by a
signal (the emulated kernel touched memory it must not; UBSan's alignment
check aborts too). The unmodified source must pass first.

    python tests/cuda_emu/mutants.py [name ...]     # ~15 s per mutant
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from mutation import attempt, finish, report  # noqa: E402
SEEDS = (1, 2, 3)
TIMEOUT_S = 600
SOURCE = ROOT / "csrc" / "cuda" / "multi_tensor_kernels.cu"

# name: (what the bug is, text in the source, its replacement)
MUTANTS = {
    "scalars_skip_counted_without_found": (
        "clip_scalars_ counts every step as skipped",
        "  if (a.count_skip && s.found) *a.skipped += 1;", "  if (a.count_skip) *a.skipped += 1;"),
    "scalars_extra_found_ignored": (
        "clip_scalars_ drops the flag the inner optimizer carried",
        " || load_coefficient(a.extra_found) > 0.0;", ";"),
    "no_sync_before_warp0": (
        "warp 0 reads the warp sums before the other warps wrote them",
        "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();",
        "  if (lane == 0) warp_sums[warp] = v;"),
    "no_sync_after_reduce": (
        "warp sums overwritten by the next chunk while warp 0 still reads them",
        "  __syncthreads();  // warp_sums may be reused at once", ""),
    "shuffle_tree_short": (
        "the warp tree starts at offset 8 and drops half the lanes",
        "  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = merge(v, shfl_down(v, offset), p);\n"
        "  if (lane == 0)",
        "  for (int offset = kWarpSize / 4; offset > 0; offset /= 2) v = merge(v, shfl_down(v, offset), p);\n"
        "  if (lane == 0)"),
    "tail_one_past": (
        "the tail reads one element past the chunk",
        "if (s.tail_begin + threadIdx.x < size)", "if (s.tail_begin + threadIdx.x <= size)"),
    "head_one_short": (
        "the misaligned head is one element short",
        "int64_t head = misalign == 0 ? 0 : (kVecBytes - misalign) / static_cast<int64_t>(sizeof(typename E::storage));",
        "int64_t head = misalign == 0 ? 0 : (kVecBytes - misalign) / static_cast<int64_t>(sizeof(typename E::storage))"
        " - 1;"),
    "tensor_ticket_early": (
        "a tensor's partials reduced before its last chunk is counted",
        "== static_cast<Ticket>(count - 1)", "== static_cast<Ticket>(count - 2)"),
    "tensor_ticket_not_reset": (
        "a tensor's ticket left nonzero for the next launch",
        "        out.tickets[span.tensor] = 0;  // ready for the next launch", ""),
    "grid_ticket_early": (
        "the total folded by a block that is not the last",
        "static_cast<Ticket>(gridDim.x - 1)", "static_cast<Ticket>(gridDim.x - 2)"),
    "stale_tensor_hint": (
        "the previous chunk's tensor kept without checking its end",
        "  if (starts[hint] <= c && c < starts[hint + 1]) return hint;", "  if (starts[hint] <= c) return hint;"),
    "search_bound": (
        "the 32-ary search's upper bound not clamped",
        "    hi = hi < lo + step ? hi : lo + step;", "    hi = lo + step;"),
    "scale_exponent_unclamped": (
        "a scale of 2^1024 (inf) for fp64 values at or above 2^1023",
        "    e = e < kMaxScaleExp ? e : kMaxScaleExp;", ""),
    "combine_unscaled": (
        "sums of different scales added without rescaling",
        "  return ScaledSum{rescale_sum(order, a.sum, a.scale, top) + rescale_sum(order, b.sum, b.scale, top), top};",
        "  (void)order;\n  return ScaledSum{a.sum + b.sum, top};"),
    "coefficient_one_writes": (
        "the scale kernel writes x * 1",
        "  if (c == 1.0) return;  // the contract: no gradient bytes touched\n  if (scale_needs_double(c)) {\n    update_all(",
        "  if (scale_needs_double(c)) {\n    update_all("),
    "tiny_coefficient_in_float": (
        "a coefficient below float's normal range rounded to float (the scale kernel)",
        "  if (scale_needs_double(c)) {\n    update_all(table, ScaleWide{c});",
        "  if (false) {\n    update_all(table, ScaleWide{c});"),
    "strided_tiny_coefficient_in_float": (
        "a coefficient below float's normal range rounded to float (the strided kernel)",
        "  if (scale_needs_double(c)) {\n    update_view(v, ScaleWide{c});",
        "  if (false) {\n    update_view(v, ScaleWide{c});"),
    "clamp_fmin_fmax": (
        "clamp through fmin/fmax (NaN becomes the bound)",
        "    v = v < lo ? lo : v;\n    return v > hi ? hi : v;", "    return fmin(fmax(v, lo), hi);"),
    "pack_swapped": (
        "two 16-bit elements swapped when a vector is stored",
        "return make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));",
        "return make_uint4(pack2(v[1], v[0]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));"),
    "head_skipped": (
        "no scalar head: 16-byte vectors from a misaligned address",
        "  int64_t head = misalign == 0 ? 0 : (kVecBytes - misalign) / static_cast<int64_t>(sizeof(typename E::storage));\n"
        "  head = head < size ? head : size;",
        "  int64_t head = 0;\n  (void)misalign;"),
    "strided_coefficient_one_writes": (
        "the strided kernel writes x * 1",
        "  if (c == 1.0) return;  // the contract: no gradient bytes touched\n  const StridedView& v",
        "  const StridedView& v"),
    "strided_wrong_stride": (
        "a strided view's dimensions paired with the wrong strides",
        "      offset += rest % v.sizes[d] * v.strides[d];",
        "      offset += rest % v.sizes[d] * v.strides[v.dims - 1 - d];"),
}


def run_tests(source: Path, seed: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTCLIP_CUDA_EMULATOR_SOURCE=str(source), FASTCLIP_CUDA_EMULATOR_SEED=str(seed))
    # Without the 30-second 2^31-element test: no mutant needs it to be caught.
    return subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda_emulated.py", "-q", "-p",
                           "no:cacheprovider", "-m", "not large"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def main(names) -> int:
    text = SOURCE.read_text()
    control = run_tests(SOURCE, SEEDS[0])
    if control.returncode != 0:
        print("the unmodified source fails the tests; fix that first:\n" + control.stdout[-2000:])
        return 2
    missed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (what, old, new) in MUTANTS.items():
            if names and name not in names:
                continue
            if text.count(old) != 1:
                print(f"{name}: the text to mutate is not in the source once; update this script")
                return 2
            mutant = Path(tmp) / f"{name}.cu"
            mutant.write_text(text.replace(old, new))
            # Schedules come from the seed: a race may need another one.
            for seed in SEEDS:
                result = attempt(lambda: run_tests(mutant, seed), TIMEOUT_S)
                if result.startswith("caught"):
                    break
            report(missed, name, f"{name:32s} {what}: {result} (seed {seed})", result)
    return finish(missed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
