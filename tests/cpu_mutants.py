"""Negative controls for the CPU test suite: plants one bug at a time in a
copy of the C++ and Python sources, rebuilds that copy in place and runs
the suite against it (without the distributed, benchmark and emulated-CUDA files,
which test other code, and test_mutant_texts.py, which would fail on any mutant). Every mutant must be caught: tests that fail, or a
test process killed by a signal. The unmodified copy must pass first.

    python tests/cpu_mutants.py [name ...]     # ~2 min per mutant on 2 cores

The copy lives in a temporary directory; this checkout and its build are
not touched.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutation import attempt, finish, hang_timeout, report

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
PYTEST = [sys.executable, "-m", "pytest", "tests", "-q", "-x", "-p", "no:cacheprovider",
          "--ignore=tests/test_distributed.py", "--ignore=tests/test_benchmark.py",
          "--ignore=tests/test_cuda_emulated.py",
          "--ignore=tests/test_mutant_texts.py"]  # it fails on every mutant's changed text: no catch

# name: (file, what the bug is, text in the file, its replacement)
MUTANTS = {
    "norm_tail_dropped": (
        "csrc/cpu/spans.cpp", "the norm's scalar tail skips the last element",
        "for (int l = 0; i < n; ++i, ++l) step(l, E::load(x, i));",
        "for (int l = 0; i + 1 < n; ++i, ++l) step(l, E::load(x, i));"),
    "scale_in_double": (
        "csrc/cpu/spans.cpp", "fp32/16-bit scaled in double, then rounded (not torch's opmath)",
        "update_span<E>(data, n, [c](T v) __attribute__((always_inline)) { return v * c; }, prefetch);",
        "update_span<E>(data, n, [coef](T v) __attribute__((always_inline)) "
        "{ return static_cast<T>(static_cast<double>(v) * coef); }, prefetch);"),
    "bf16_pairs_swapped": (
        "csrc/cpu/spans.cpp", "the portable bf16 update writes the two elements of a pair swapped",
        "store_pair(x + i, bf16_join(bf16_word_of(op(bf16_first(pair))), bf16_word_of(op(bf16_second(pair)))));",
        "store_pair(x + i, bf16_join(bf16_word_of(op(bf16_second(pair))), bf16_word_of(op(bf16_first(pair)))));"),
    "bf16_avx512_words_unpermuted": (
        "csrc/cpu/spans.cpp", "the AVX512-BF16 update stores its even results, then its odd ones",
        "_mm512_storeu_si512(x + i, _mm512_permutexvar_epi16(interleave, rounded));",
        "_mm512_storeu_si512(x + i, rounded);"),
    "bf16_avx512_subnormals_unchecked": (
        "csrc/cpu/spans.cpp", "the AVX512-BF16 update rounds subnormal results itself (to zero)",
        "if ((_mm512_fpclass_ps_mask(even, kSubnormal) | _mm512_fpclass_ps_mask(odd, kSubnormal)) != 0) {",
        "if (false) {"),
    "chunk_offsets_32_bit": (
        "csrc/cpu/multi_tensor_cpu.cpp", "a chunk's byte offset in its tensor truncated to 32 bits",
        "spans[c] = StreamSpan{static_cast<char*>(d.data) + ch.begin * size, ch.size * size, pos};",
        "spans[c] = StreamSpan{static_cast<char*>(d.data) + static_cast<int32_t>(ch.begin * size), "
        "ch.size * size, pos};"),
    "clamp_nan_to_bound": (
        "csrc/cpu/spans.cpp", "clamp turns NaN into the lower bound",
        "    v = v < lo ? lo : v;\n    return v > hi ? hi : v;",
        "    v = !(v >= lo) ? lo : v;\n    return v > hi ? hi : v;"),
    "max_drops_nan": (
        "csrc/cpu/span_common.h", "the inf-norm's max drops NaN",
        "  return ((v > m) | (v != v)) ? v : m;", "  return (v > m) ? v : m;"),
    "bf16_truncates": (
        "csrc/numerics.h", "float to bf16 truncates instead of rounding to nearest even",
        "return f != f ? (u | 0x00400000u) : u + 0x7FFFu + ((u >> 16) & 1u);",
        "return f != f ? (u | 0x00400000u) : u;"),
    "epsilon_changed": (
        "csrc/numerics.h", "the clip's epsilon 1e-7 instead of torch's 1e-6",
        "constexpr double kClipEpsilon = 1e-6;", "constexpr double kClipEpsilon = 1e-7;"),
    # (Moving the rescue's threshold from 2^-960 to 2^-1020 is not caught,
    # and cannot be through the API: it changes fp64 norms below float32's
    # range, returned as 0, by ~2^-45 relative, and their coefficient is
    # decided by the 1e-6 epsilon.)
    "no_underflow_rescue": (
        "csrc/numerics.h", "power sums that underflowed are not recomputed scaled",
        "return finite_data && (sum_overflowed(order, acc) || acc < kRescueTiny || all_overflowed || small_order);",
        "return finite_data && (sum_overflowed(order, acc) || all_overflowed || small_order);"),
    "tiny_orders_not_rescued": (
        "csrc/numerics.h", "orders below 2^-20 not recomputed scaled (a single value's norm wrong)",
        "const bool small_order = order.kind == NormKind::kP && order.p < kRescueSmallOrder;",
        "const bool small_order = false;"),
    "workers_ignore_denormal_mode": (
        "csrc/cpu/multi_tensor_cpu.cpp", "worker threads run without the caller's flush-denormal mode",
        "    [[maybe_unused]] const auto guard = mode.apply();\n", ""),
    "coefficient_one_writes": (
        "csrc/cpu/multi_tensor_cpu.cpp", "scale by exactly 1 still writes",
        "  if (coef == 1.0) return;  // the contract: no memory traffic at all\n  update_tensors", "  update_tensors"),
    "tiny_coefficient_in_float": (
        "csrc/cpu/spans.cpp", "a coefficient below float's normal range rounded to float (every dtype's scale)",
        "    if (scale_needs_double(coef)) {", "    if (false) {"),
    "shared_memory_races": (
        "csrc/cpu/multi_tensor_cpu.cpp", "entries that share memory written by two threads at once",
        "  if (host_runs_serially()) return false;",
        "  return false;"),
    # The software prefetcher (tests/test_prefetch_stream.py): it cannot
    # change a result, only which lines are asked for and when.
    "prefetch_past_segment_head": (
        "csrc/cpu/spans.h", "the prefetcher walks whole large tensors, past their head",
        "if (line_ >= end_ || line_pos_ >= head_end_) next_span();", "if (line_ >= end_) next_span();"),
    "prefetch_segments_never_continue": (
        "csrc/cpu/spans.h", "every chunk starts a segment of its own (whole tensors prefetched)",
        "if (!continues) head_end_ = s.pos + head_;", "if (!continues || head_ > 0) head_end_ = s.pos + head_;"),
    "prefetch_lead_dropped_per_chunk": (
        "csrc/cpu/spans.h", "the prefetcher starts each chunk with no lead",
        "target_ = spans_[c].pos + lead_;", "target_ = spans_[c].pos;"),
    "prefetch_vendor_inverted": (
        "csrc/cpu/multi_tensor_cpu.cpp", "the driver prefetches whole segments where the CPU rule says heads",
        "      whole = whole_segments_by_cpu();", "      whole = !whole_segments_by_cpu();"),
    "prefetch_amd_rule_dropped": (
        "csrc/cpu/multi_tensor_cpu.cpp", "AMD CPUs without AVX-512 (Zen 3) get heads, as before session 32",
        '  return __builtin_cpu_is("amd") && !__builtin_cpu_supports("avx512f");', "  return false;"),
    "prefetch_variable_ignored": (
        "csrc/cpu/multi_tensor_cpu.cpp", "FASTCLIP_CPU_PREFETCH read but not followed",
        '    bool whole = mode == "all";', "    bool whole = whole_segments_by_cpu();"),
    "prefetch_head_not_whole": (
        "csrc/cpu/multi_tensor_cpu.cpp", "the whole-segment choice made, but the driver given the 16 KiB head",
        "whole ? PrefetchStream::kWholeSegments : kPrefetchHeadBytes", "kPrefetchHeadBytes"),
    "freed_storage_accepted": (
        "csrc/ops.cpp", "tensors beyond their storage's bytes not refused",
        "TORCH_CHECK(t.numel() == 0 || within_storage(t, storage),",
        "TORCH_CHECK(t.numel() == 0 || true || within_storage(t, storage),"),
    # The Python layer.
    "fake_clip_unchecked": (
        "fastclip/_ops.py", "the fake kernel of clip_ checks nothing (bad arguments traced)",
        '        _C.check_list_op("clip_", tensors, ord=ord, max_norm=max_norm)\n', ""),
    "device_context_takes_ops_path": (
        "fastclip/clip.py", "with torch.device(...) every call takes the torch.ops path",
        "type(mode) is not DeviceContext for mode", "True for mode"),
    "nan_max_norm_accepted": (
        "fastclip/clip.py", "max_norm NaN accepted",
        "    if not _in_range(0.0, value, _DOUBLE_MAX):  # also rejects NaN\n",
        "    if value < 0.0 or value > _DOUBLE_MAX:\n"),
    "negative_clip_value_accepted": (
        "fastclip/clip.py", "a negative clip_value accepted",
        "    if not _in_range(0.0, value, math.inf):  # also rejects NaN\n        raise ValueError(f\"clip_value",
        "    if value != value:\n        raise ValueError(f\"clip_value"),
    "cow_reads_copy": (
        "csrc/ops.cpp", "reads of copy-on-write memory through the mutable pointer (copies it)",
        "shared ? const_cast<void*>(t.const_data_ptr()) : t.data_ptr();", "t.data_ptr();"),
    "cow_written_shared": (
        "csrc/ops.cpp", "the clip writes through the table that read copy-on-write memory (the source too)",
        "      shared_reads_ = shared_reads_ || (writes && shared && numel != 0);\n", ""),
    "vmap_coef_read_while_written": (
        "fastclip/_ops.py", "under vmap, per-sample coefficients not copied before the first write",
        "coef.to(dtype, copy=True) for dtype", "coef.to(dtype) for dtype"),
    "positions_under_a_mode": (
        "fastclip/clip.py", "grad_norms's positions from the C++ gather under a dispatch mode",
        "    if held is not None and _get_current_dispatch_mode() is None:\n        have = held.positions()",
        "    if held is not None:\n        have = held.positions()"),
    "vmap_functional_values_to_the_op": (
        "fastclip/_ops.py", "under functionalize(vmap), the clamp and scale rules call the in-place op",
        "        return any(torch._is_functional_tensor(t) for t in tensors)\n", "        return False\n"),
    "traced_bounds_unchecked": (
        "fastclip/clip.py", "while dynamo traces, every max_norm and clip_value taken as unreadable (unchecked)",
        "    return guard_or_true(sign) and not guard_or_false(sign)\n", "    return True\n"),
    "coefficient_not_clamped": (
        "fastclip/clip.py", "the split path's coefficient not clamped to 1 (small norms scaled up)",
        "    return torch.clamp(numerator / (norm + 1e-6), max=1.0)",
        "    return numerator / (norm + 1e-6)"),
    "fallback_combine_unscaled": (
        "fastclip/_fallback.py", "the fallback combines per-tensor norms without scaling (overflow)",
        "    return _scaled_norm(norms, scale, ord, dim)",
        "    return torch.linalg.vector_norm(norms, ord, dim=dim)"),
    "fallback_tiny_sum_kept": (
        "fastclip/_fallback.py", "the fallback keeps a power sum below 2^-960 (digits lost to subnormals)",
        "    tiny = torch.log2(norm) * ord < RESCUE_TINY_LOG2",
        "    tiny = torch.zeros((), dtype=torch.bool)"),
    "fallback_small_ratio_dropped": (
        "fastclip/_fallback.py", "below order 1 a norm under the double range of the largest is dropped",
        "    tiny = (ratio < RATIO_TINY) & (values > 0) & torch.isfinite(scale)",
        "    tiny = torch.zeros_like(ratio, dtype=torch.bool)"),
    "subclass_shares_a_call": (
        "fastclip/clip.py", "a __torch_dispatch__ subclass shares an op call with plain tensors",
        "        buckets.setdefault((t.device, reason is None, _dispatch_type(t)), []).append(i)",
        "        buckets.setdefault((t.device, reason is None, None), []).append(i)"),
    "fallback_reads_beyond_storage": (
        "fastclip/clip.py", "the fallback's norms read a gradient with elements beyond its storage",
        "            _refuse_unreadable(part)\n",
        ""),
    "fused_step_divisor_inverted": (
        "csrc/numerics.h", "the fused step's grad_scale multiplies by the coefficient instead of dividing",
        "  s.divisor = static_cast<float>(loss_scale * extra_scale / s.coef);",
        "  s.divisor = static_cast<float>(loss_scale * extra_scale * s.coef);"),
    "user_grad_scale_ignored": (
        "fastclip/optim.py", "a grad_scale the user set on the inner optimizer is dropped",
        "            raw, divisor, saved.get(\"grad_scale\"), scaler_found, user_found,",
        "            raw, divisor, None, scaler_found, user_found,"),
    "user_found_inf_ignored": (
        "fastclip/optim.py", "a found_inf the user set on the inner optimizer is dropped",
        "            raw, divisor, saved.get(\"grad_scale\"), scaler_found, user_found,",
        "            raw, divisor, saved.get(\"grad_scale\"), scaler_found, None,"),
    "scaler_found_inf_dropped": (
        "fastclip/optim.py", "the found_inf a GradScaler sets on the wrapper is dropped",
        "            raw, divisor, saved.get(\"grad_scale\"), scaler_found, user_found,",
        "            raw, divisor, saved.get(\"grad_scale\"), None, user_found,"),
    "scalar_inputs_not_converted": (
        "fastclip/optim.py", "a bool flag or an integer loss scale reaches clip_scalars_ as it is",
        "    if t is None or (t.device == device and t.dtype in _clip._KERNEL_DTYPES):\n        return t",
        "    if True:\n        return t"),
    "scalars_factor_by_reciprocal": (
        "csrc/numerics.h", "the unfused step's factor is the coefficient times 1 / loss_scale (two roundings)",
        "  s.factor = s.coef / loss_scale;", "  s.factor = s.coef * (1.0 / loss_scale);"),
    "scalars_inf_divisor_not_found": (
        "csrc/numerics.h", "a fused divisor beyond float32's range does not skip the step",
        "(skip_inf_divisor && fabs(s.divisor) == INFINITY)", "false"),
    "scalars_skip_counted_always": (
        "csrc/cpu/multi_tensor_cpu.cpp", "clip_scalars_ counts every step as skipped",
        "  if (count_skip) *skipped.data_ptr<int64_t>() += s.found ? 1 : 0;",
        "  if (count_skip) *skipped.data_ptr<int64_t>() += 1;"),
    "fp64_norms_rounded": (
        "csrc/cpu/multi_tensor_cpu.cpp", "the op's fp64 outputs are the float32 norms widened",
        "  return {fp64 ? scalar_double(total) : scalar_float(total), each};",
        "  return {fp64 ? scalar_double(static_cast<float>(total)) : scalar_float(total), each};"),
    "wrapper_coef_from_float32_norm": (
        "csrc/numerics.h", "the wrapper's coefficient comes from the float32 norm",
        "  s.coef = clip_coefficient(max_norm, s.norm);",
        "  s.coef = clip_coefficient(max_norm, static_cast<float>(s.norm));"),
    "wrapper_logs_reassigned": (
        "fastclip/optim.py", "the wrapper's logs are new tensors each step (lost in a compiled step)",
        "        if self.last_norm.device != device or self.last_norm.dtype != torch.float32:",
        "        if True:"),
    "bf16_order1_avx512_lanes_swapped": (
        "csrc/cpu/spans.cpp", "the AVX-512 bf16 order-1 kernel sums odd elements in even lanes",
        "    acc[1] = _mm512_add_pd(acc[1], widen_high(even));\n    acc[2] = _mm512_add_pd(acc[2], widen_low(odd));\n",
        "    acc[1] = _mm512_add_pd(acc[1], widen_low(odd));\n    acc[2] = _mm512_add_pd(acc[2], widen_high(even));\n"),
    "bf16_order1_avx2_lanes_swapped": (
        "csrc/cpu/spans.cpp", "the AVX2 bf16 order-1 kernel sums odd elements in even lanes",
        "      acc[2 * h + 1] = _mm256_add_pd(acc[2 * h + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(even, 1)));\n"
        "      acc[4 + 2 * h] = _mm256_add_pd(acc[4 + 2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(odd)));\n",
        "      acc[2 * h + 1] = _mm256_add_pd(acc[2 * h + 1], _mm256_cvtps_pd(_mm256_castps256_ps128(odd)));\n"
        "      acc[4 + 2 * h] = _mm256_add_pd(acc[4 + 2 * h], _mm256_cvtps_pd(_mm256_extractf128_ps(even, 1)));\n"),
    "grad_warning_dropped": (
        "csrc/python.cpp", "the gather reads an undefined gradient without torch's non-leaf warning",
        "  return t.grad();  // undefined: torch's warning for a tensor that is not a leaf",
        "  static const at::Tensor none;\n  return none;"),
    "retained_grad_skipped": (
        "csrc/python.cpp", "the gather takes the gradient only where the tensor is a leaf",
        "    if (grad.defined()) return grad;",
        "    if (grad.defined() && t.is_leaf()) return grad;\n    if (grad.defined()) { static const at::Tensor none; return none; }"),
    "power_series_term_dropped": (
        "csrc/cpu/power.cpp", "the general order's log series skips its s^5/5 term",
        "  q = q * z + 1.0 / 5;\n", ""),
    "power_two_step_scaling_dropped": (
        "csrc/cpu/power.cpp", "2^n beyond +-1000 drops its second step (off by 2^128)",
        "  const double second = low ? 0x1p-128 : (big ? 0x1p128 : 1.0);",
        "  const double second = 1.0;"),
    "root_overflow_not_rescued": (
        "csrc/numerics.h", "orders below 1: a finite sum whose root overflows is not rescued (norm inf)",
        "  const bool small_p = order.kind == NormKind::kP && order.p < 1.0;",
        "  const bool small_p = false;"),
    "gapped_views_written_last": (
        "csrc/cpu/multi_tensor_cpu.cpp", "views with gaps written after the entries whose bytes they reach",
        "  if (table.gaps_reach_dense(tensors)) {",
        "  if (false) {"),
    "f16c_inf_norm_drops_nan": (
        "csrc/cpu/spans.cpp", "the F16C fp16 inf-norm's vector body drops NaN (a max without the unordered test)",
        "const __m256 take = _mm256_or_ps(_mm256_cmp_ps(a, amax[k], _CMP_GT_OQ), _mm256_cmp_ps(a, a, _CMP_UNORD_Q));",
        "const __m256 take = _mm256_cmp_ps(a, amax[k], _CMP_GT_OQ);"),
    "f16c_tail_max_drops_nan": (
        "csrc/cpu/spans.cpp", "the F16C fp16 inf-norm's tail drops NaN",
        "    if (K == NormKind::kInf) maxes[l] = max_keep_nan(maxes[l], std::fabs(raw));",
        "    if (K == NormKind::kInf) maxes[l] = std::max(maxes[l], std::fabs(raw));"),
    "torch_function_items_taken_plain": (
        "csrc/python.cpp", "a __torch_function__ subclass in a list of tensors goes to the kernels unseen",
        '          why_ = "torch_function subclass";', ""),
    "foreign_storages_unchecked": (
        "csrc/ops.cpp", "storages over memory from outside torch are taken to own it (overlap missed)",
        "      foreign_ = foreign_ || (numel != 0 && storage->allocator() == nullptr);",
        "      foreign_ = false;"),
    "getattribute_override_ignored": (
        "csrc/python.cpp", "a __getattribute__ override does not send .grad to Python",
        "entry(type, grad_name) == base_grad && entry(type, getattribute_name) == base_getattribute &&",
        "entry(type, grad_name) == base_grad &&"),
    # Caught only by tests/test_memory_bounds.py (guard and read-only pages).
    "f16c_tail_reads_past_end": (
        "csrc/cpu/spans.cpp", "the F16C fp16 update loads its tail as a whole vector in place (past the end)",
        "    for (int64_t j = i; j < n; ++j) tail[j - i] = x[j];\n    store8(tail, op(load8(tail)));\n",
        "    store8(tail, op(load8(x + i)));\n"),
    "clip_coefficient_one_writes": (
        "csrc/cpu/multi_tensor_cpu.cpp", "clip_ with a coefficient of exactly 1 stores what it read (no version bump)",
        "  if (coef == 1.0) return scalar_float(total);  // the contract: no memory traffic at all\n",
        "  if (coef == 1.0 && table.in_place()) update_all(table, work, scale_fn, coef);\n"
        "  if (coef == 1.0) return scalar_float(total);\n"),
    "fold_ignores_layout": (
        "fastclip/optim.py", "the clip is folded into a fused step whatever the gradients' layout",
        "held.dense_and_apart if held is not None\n"
        "            else _ops.dense_and_apart(grads) and len({g.device.type for g in grads}) == 1",
        "True"),
    "vmap_coef_of_another_sample": (
        "fastclip/_ops.py", "under torch.vmap each sample is clipped by the next sample's coefficient",
        "        _scale_samples(tensors, dims, coef)\n",
        "        _scale_samples(tensors, dims, coef.roll(1))\n"),
    "slices_layout_ignored": (
        "csrc/ops.cpp", "multi_tensor_norm's slices are read in place whatever the tensor's layout",
        "} else if (t.select(0, 0).is_non_overlapping_and_dense()) {",
        "} else if (true) {"),
    "slices_copied_row_major": (
        "csrc/ops.cpp", "multi_tensor_norm's dense slices with gaps between them are read through a row-major copy",
        "} else if (t.select(0, 0).is_non_overlapping_and_dense()) {",
        "} else if (t.is_non_overlapping_and_dense() && t.stride(0) == per_slice) {"),
    "slices_reversed": (
        "csrc/ops.cpp", "multi_tensor_norm's slices of a tensor are reported in reverse order",
        "descs_.push_back(TensorDesc{first + s * t.stride(0) * size, per_slice, dtype});",
        "descs_.push_back(TensorDesc{first + (slices - 1 - s) * t.stride(0) * size, per_slice, dtype});"),
    "vmap_batch_dims_merged_row_major": (
        "fastclip/_ops.py", "under nested torch.vmap, batch dimensions that do not merge are copied row-major",
        "        if r.shape[0] == 1 or r.shape[1] == 1 or r.stride(0) == r.stride(1) * r.shape[1]:",
        "        if True:"),
    "vmap_general_order_totals_by_the_kernel": (
        "fastclip/_ops.py", "under torch.vmap every order's totals are combined by the kernels' approximate powers",
        "        if ord in _EXACT_POWER_ORDERS:",
        "        if True:"),
    "vmap_edge_not_settled": (
        "fastclip/_ops.py", "under torch.vmap float64 totals at the double range's edge are not taken from the op",
        "        if not any(t.dtype == torch.float64 for t in tensors) or not _readable(totals):",
        "        if True:"),
    "vmap_norms_of_shared_tensors_per_slice_dropped": (
        "fastclip/_ops.py", "under nested torch.vmap an unbatched tensor's norm is taken whole, not per slice",
        "[tensors[i] for i in shared], ord, True, True, slices)",
        "[tensors[i] for i in shared], ord, True, True)"),
    "vmap_nonfinite_ignored": (
        "fastclip/_ops.py", "under torch.vmap error_if_nonfinite does not raise on a NaN/inf sample",
        "        if bad:\n",
        "        if False:\n"),
    "walk_storage_unchecked": (
        "csrc/ops.cpp", "the table's walk on threads takes a tensor with elements beyond its storage",
        "            !within_storage(t, storage)) {",
        "            false) {"),
    "walk_inference_unchecked": (
        "csrc/ops.cpp", "the table's walk on threads lets an inference tensor be written outside InferenceMode",
        "t.device() != checks->device || (checks->writes && t.is_inference()))) {",
        "t.device() != checks->device)) {"),
    "walk_foreign_dropped": (
        "csrc/ops.cpp", "only the first range of the table's walk marks memory from outside torch",
        "    if (range_foreign) foreign.store(true, std::memory_order_relaxed);",
        "    if (range_foreign && begin == 0) foreign.store(true, std::memory_order_relaxed);"),
    "walk_bumps_counterless_on_workers": (
        "csrc/ops.cpp", "the bumps on threads bump a tensor without a counter in the worker's InferenceMode",
        "      if (impl->version_counter().enabled()) {",
        "      if (true) {"),
}


def run(cmd, cwd: Path, timeout_s: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


def cpu_runs(text: str) -> bool:
    """Whether this CPU runs the kernel the mutated text is in: an AVX-512
    kernel's bug cannot show on a CPU without AVX-512 (the suite passes
    there by running the AVX2 or portable kernels)."""
    if "_mm512" not in text:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: run it, and let the verdict say
    return all(flag in flags for flag in ("avx512f", "avx512bw", "avx512vl"))


def build(copy: Path) -> None:
    done = run([sys.executable, "setup.py", "build_ext", "--inplace"], copy)
    if done.returncode != 0:
        raise RuntimeError("build failed:\n" + done.stderr[-3000:])


def main(names) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "fastclip"
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
        for name in files.stdout.split():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
        build(copy)
        where = run([sys.executable, "-c", "import fastclip; print(fastclip.__file__)"], copy).stdout.strip()
        if not where.startswith(str(copy)):
            print(f"the copy's tests would import fastclip from {where}; uninstall other copies first")
            return 2
        started = time.monotonic()
        control = run(PYTEST, copy)
        if control.returncode != 0:
            print("the unmodified copy fails the tests; fix that first:\n" + control.stdout[-2000:])
            return 2
        timeout_s = hang_timeout(time.monotonic() - started)
        print(f"unmodified copy: passed in {time.monotonic() - started:.0f} s; a run past {timeout_s} s is a hang")
        missed, not_run = [], []
        for name, (path, what, old, new) in MUTANTS.items():
            if names and name not in names:
                continue
            if not cpu_runs(old):
                print(f"{name:30s} {what}: not run (this CPU has no AVX-512, so the suite never runs that kernel)")
                not_run.append(name)
                continue
            source = copy / path
            text = source.read_text()
            if text.count(old) != 1:
                print(f"{name}: the text to mutate is not in {path} once; update this script")
                return 2
            source.write_text(text.replace(old, new))
            try:
                build(copy)
                result = attempt(lambda: run(PYTEST, copy, timeout_s), timeout_s)
            finally:
                source.write_text(text)
            report(missed, name, f"{name:30s} {what}: {result}", result)
    return finish(missed, not_run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
