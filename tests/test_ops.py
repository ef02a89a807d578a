"""The dispatcher ops (``torch.ops.fastclip.*``) against a float64 reference.

Every list shape that has bitten multi-tensor kernels before is a case here:
a lone 0-dim tensor, 0-size tensors among others, transposed views, views
with gaps, data at an odd element offset, a shape that is not a multiple of
anything, many tensors, and dtypes mixed in one list.
"""
from __future__ import annotations

import math
import random
import sys

import pytest
import torch

import fastclip  # registers the ops
from testing import (
    DEVICE_PARAMS,
    DTYPES,
    FP64_SCALE_RTOL,
    HAS_CUDA,
    ORDS,
    TOLERANCES,
    assert_identical,
    assert_norm_close,
    assert_same_bits,
    assert_scaled_close,
    assert_untouched,
    available_memory_bytes,
    clip_scalars_cases,
    dtype_id,
    gapped_view,
    make_grads,
    make_params,
    offset_view,
    ord_id,
    poison,
    poison_allocator,
    uninitialized_memory_as_nan,
    ref_coef,
    ref_norm,
    ref_norms_each,
    ref_scaled,
    require_kernel,
    run_clip_scalars,
    snapshot,
)
from fastclip import _fallback

ops = torch.ops.fastclip


@pytest.fixture(autouse=True)
def _outputs_start_as_nan():
    with uninitialized_memory_as_nan():
        yield


# A finite value no op here produces from randn data: gaps filled with it
# show a write (NaN would not, since NaN * c and clamp(NaN) are NaN again).
SENTINEL = 12288.0  # 1.5 * 2**13, exact in every dtype


# ------------------------------------------------------------------- cases
# Each builder returns (tensors, gaps): the list handed to the op and the
# memory next to it (the gaps of strided views, the element before an
# offset view) that the op must neither read nor write. Gaps start as NaN.
def _scalar_0d(dtype, device):
    return make_grads([()], dtype, device, seed=1), []


def _with_empty(dtype, device):
    return make_grads([(7,), (0,), (3, 0, 2), (4, 5)], dtype, device, seed=2), []


def _transposed(dtype, device):
    a, b = make_grads([(9, 6), (3, 4, 5)], dtype, device, seed=3)
    return [a.t(), b.permute(2, 0, 1), make_grads([(11,)], dtype, device, seed=4)[0]], []


def _gaps(dtype, device):
    views = [gapped_view((6, 10), dtype, device, seed=5), gapped_view((3, 5), dtype, device, seed=6)]
    plain = make_grads([(13,)], dtype, device, seed=7)[0]
    return [views[0], plain, views[1]], [v._base[:, 1::2] for v in views]


def _offset(dtype, device):
    views = [offset_view(91, dtype, device, seed=8), offset_view(3, dtype, device, seed=9)]
    return [views[0].view(7, 13), views[1]], [v._base[:1] for v in views]


def _odd_shape(dtype, device):
    # 75,645 elements: more than one 64 Ki chunk, and no multiple of any vector width.
    return make_grads([(5, 123, 123)], dtype, device, seed=10), []


def _many(dtype, device, count=1000):
    rng = random.Random(11)
    shapes = [
        (rng.randint(1, 300),) if rng.random() < 0.5 else (rng.randint(1, 17), rng.randint(1, 17))
        for _ in range(count)
    ]
    return make_grads(shapes, dtype, device, seed=12), []


CASES = {
    "scalar_0d": _scalar_0d,
    "with_empty": _with_empty,
    "transposed": _transposed,
    "gaps": _gaps,
    "offset": _offset,
    "odd_5x123x123": _odd_shape,
    "1000_tensors": _many,
}

case_param = pytest.mark.parametrize("case", list(CASES))
dtype_param = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
ord_param = pytest.mark.parametrize("ord", ORDS, ids=ord_id)
device_param = pytest.mark.parametrize("device", DEVICE_PARAMS)


def _fill_gaps(gaps, value):
    poison(*gaps) if math.isnan(value) else [g.fill_(value) for g in gaps]
    return [g.clone() for g in gaps]


def _assert_gaps_kept(gaps, copies):
    for gap, copy in zip(gaps, copies):
        assert_same_bits(gap, copy)


# -------------------------------------------------------------------- norm
@device_param
@ord_param
@dtype_param
@case_param
def test_norm_matches_reference(case, dtype, ord, device):
    require_kernel(device)
    tensors, gaps = CASES[case](dtype, device)
    gap_copies = _fill_gaps(gaps, math.nan)  # a read of a gap makes the norm NaN
    before = snapshot(tensors)
    poison_allocator([1, len(tensors)], device)

    total, each = ops.multi_tensor_norm(tensors, ord, True)

    assert total.shape == () and total.device.type == device
    assert each.shape == (len(tensors),) and each.dtype == torch.float32 and each.device.type == device
    assert_norm_close(total, ref_norm(tensors, ord), dtype)
    assert_norm_close(each, ref_norms_each(tensors, ord), dtype)
    assert_untouched(tensors, before)
    _assert_gaps_kept(gaps, gap_copies)

    total_only, none = ops.multi_tensor_norm(tensors, ord, False)
    assert none.shape == (0,) and none.dtype == torch.float32
    assert_same_bits(total_only, total)

    # fp64: the same norms, before their rounding to float32.
    wide_total, wide_each = ops.multi_tensor_norm(tensors, ord, True, True)
    assert wide_total.dtype == wide_each.dtype == torch.float64 and wide_total.shape == ()
    assert_same_bits(wide_total.float(), total)
    assert_same_bits(wide_each.float(), each)
    assert_untouched(tensors, before)


# ----------------------------------------------------- norm of slices
# multi_tensor_norm(..., slices=S): every tensor is S slices along its first
# dimension (torch.vmap's samples). Each builder returns (tensors, gaps)
# with every first dimension SLICES; the layouts cover the table's three
# ways (in place, in place although permuted inside, one contiguous copy).
SLICES = 3


def _slices_contiguous(dtype, device):
    return make_grads([(SLICES, 7, 5), (SLICES,), (SLICES, 1, 3)], dtype, device, seed=90), []


def _slices_first_dim_innermost(dtype, device):
    # Dense, but slice s is every SLICES-th element: read through a copy.
    a, b = make_grads([(9, SLICES), (4, SLICES, 2)], dtype, device, seed=91)
    return [a.t(), b.transpose(0, 1)], []


def _slices_permuted_inside(dtype, device):
    # The first dimension outermost in memory, the others permuted: in place.
    a, b = make_grads([(SLICES, 4, 6), (SLICES, 3, 4, 5)], dtype, device, seed=92)
    return [a.transpose(1, 2), b.contiguous(memory_format=torch.channels_last)], []


def _slices_gaps_and_offset(dtype, device):
    view = gapped_view((SLICES, 10), dtype, device, seed=93)
    shifted = offset_view(SLICES * 13, dtype, device, seed=94)
    return [view, shifted.view(SLICES, 13)], [view._base[:, 1::2], shifted._base[:1]]


def _slices_dense_with_gaps_between(dtype, device):
    # Gaps between the slices, each slice dense but column-major, and more
    # than a chunk: read in place in memory order, as the op reads the view
    # (found in review: a row-major copy changed the bits).
    base = make_grads([(SLICES, 2, 1031, 64)], dtype, device, seed=103)[0]
    return [base[:, 0].transpose(1, 2)], []


def _slices_expanded_and_empty(dtype, device):
    row, empty = make_grads([(1, 6), (SLICES, 0, 4)], dtype, device, seed=95)
    return [row.expand(SLICES, 6), empty, make_grads([(SLICES, 2)], dtype, device, seed=96)[0]], []


def _slices_beyond_a_chunk(dtype, device):
    # Each slice 70,001 elements: more than one 64 Ki chunk, an odd tail.
    return make_grads([(SLICES, 70001)], dtype, device, seed=97), []


SLICE_CASES = {
    "contiguous": _slices_contiguous,
    "first_dim_innermost": _slices_first_dim_innermost,
    "permuted_inside": _slices_permuted_inside,
    "gaps_and_offset": _slices_gaps_and_offset,
    "dense_with_gaps_between": _slices_dense_with_gaps_between,
    "expanded_and_empty": _slices_expanded_and_empty,
    "beyond_a_chunk": _slices_beyond_a_chunk,
}


def _slices_of(tensors):
    return [s for t in tensors for s in t.unbind(0)]


@device_param
@ord_param
@dtype_param
@pytest.mark.parametrize("case", list(SLICE_CASES))
def test_norm_of_slices_is_the_norm_of_every_slice(case, dtype, ord, device):
    """Per-slice norms against the float64 reference, and bit for bit those
    of the op called on the slices as a list of views (the vmap rules
    promise per-sample norms identical to the op on each sample)."""
    require_kernel(device)
    tensors, gaps = SLICE_CASES[case](dtype, device)
    gap_copies = _fill_gaps(gaps, math.nan)
    before = snapshot(tensors)
    slices = _slices_of(tensors)
    poison_allocator([1, len(slices)], device)
    for fp64 in (False, True):
        total, each = ops.multi_tensor_norm(tensors, ord, True, fp64, slices=SLICES)
        assert each.shape == (len(slices),) and total.shape == ()
        assert each.dtype == total.dtype == (torch.float64 if fp64 else torch.float32)
        views_total, views_each = ops.multi_tensor_norm(slices, ord, True, fp64)
        assert_same_bits(each, views_each)
        assert_same_bits(total, views_total)
        if not fp64:
            assert_norm_close(each, ref_norms_each(slices, ord), dtype)
            assert_norm_close(total, ref_norm(tensors, ord), dtype)
            total_only, none = ops.multi_tensor_norm(tensors, ord, False, slices=SLICES)
            assert none.shape == (0,)
            assert_same_bits(total_only, total)
    assert_untouched(tensors, before)
    _assert_gaps_kept(gaps, gap_copies)


@device_param
@ord_param
@pytest.mark.parametrize("dtype,big,small", [(torch.float32, 1e30, 1e-30), (torch.float64, 1e300, 1e-300),
                                             (torch.bfloat16, 3e38, 1e-38)], ids=lambda v: dtype_id(v)
                         if isinstance(v, torch.dtype) else "")
def test_norm_of_slices_each_safe_from_overflow_and_nonfinite(dtype, big, small, ord, device):
    """A slice of huge values, one of tiny values and one with a NaN or an
    inf: each slice's norm is its own (the NaN stays in its slice)."""
    require_kernel(device)
    base = make_grads([(5, 33)], torch.float32, "cpu", seed=98)[0].double()
    scales = torch.tensor([1.0, big, small, 1.0, 1.0], dtype=torch.float64).view(5, 1)
    values = (base * scales).to(dtype=dtype, device=device)
    values[3, 7] = math.nan
    values[4, 20] = -math.inf
    _, each = ops.multi_tensor_norm([values], ord, True, True, slices=5)
    expected = ref_norms_each(list(values.unbind(0)), ord)
    torch.testing.assert_close(each[:3].cpu(), expected[:3], rtol=1e-12, atol=0.0)
    assert math.isnan(each[3].item()) and each[4].item() == math.inf


@device_param
def test_norm_of_slices_mixed_dtypes_matches_the_fallback(device):
    require_kernel(device)
    tensors = make_grads([(SLICES, 40), (SLICES, 3, 3), (SLICES,), (SLICES, 17)],
                         [torch.float32, torch.bfloat16, torch.float64, torch.float16], device, seed=99)
    for ord in ORDS:
        total, each = ops.multi_tensor_norm(tensors, ord, True, True, slices=SLICES)
        ref_total, ref_each = _fallback.multi_tensor_norm([t.cpu() for t in tensors], ord, True, True, SLICES)
        torch.testing.assert_close(each.cpu(), ref_each, rtol=1e-14, atol=0.0)
        torch.testing.assert_close(total.cpu(), ref_total, rtol=1e-14, atol=0.0)


SLICE_ERRORS = [
    ("zero", lambda ts: (ts, 0), "slices must be at least 1, got 0"),
    ("negative", lambda ts: (ts, -2), "slices must be at least 1, got -2"),
    ("first_dim_differs", lambda ts: (ts, 2), r"tensors\[0\] has shape \[3, 4\], but slices=2"),
    ("0_dim_tensor", lambda ts: ([ts[0], torch.tensor(1.0)], 3), r"tensors\[1\] has shape \[\], but slices=3"),
    ("later_tensor", lambda ts: (ts + [torch.zeros(4, 3)], 3), r"tensors\[2\] has shape \[4, 3\]"),
]


@pytest.mark.parametrize("impl", ["op", "fake", "fallback"])
@pytest.mark.parametrize("make, match", [e[1:] for e in SLICE_ERRORS], ids=[e[0] for e in SLICE_ERRORS])
def test_norm_of_slices_errors_name_the_argument(make, match, impl):
    tensors, slices = make(make_grads([(3, 4), (3,)], torch.float32, "cpu", seed=100))
    if impl == "fallback":
        with pytest.raises(RuntimeError, match=match):
            _fallback.multi_tensor_norm(tensors, 2.0, True, False, slices)
        return
    if impl == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
        tensors = [mode.from_tensor(t) for t in tensors]
        with mode, pytest.raises(RuntimeError, match=match):
            ops.multi_tensor_norm(tensors, 2.0, True, slices=slices)
        return
    with pytest.raises(RuntimeError, match=match):
        ops.multi_tensor_norm(tensors, 2.0, True, slices=slices)


@device_param
def test_opcheck_norm_of_slices(device):
    require_kernel(device)
    tensors = make_grads([(4, 3), (4,), (4, 0)], torch.float32, device, seed=101)
    tensors.append(make_grads([(6, 4)], torch.bfloat16, device, seed=102)[0].t())
    torch.library.opcheck(ops.multi_tensor_norm.default, (tensors, 2.0, True, False, 4))
    torch.library.opcheck(ops.multi_tensor_norm.default, (tensors, math.inf, True, True, 4))


@device_param
@pytest.mark.parametrize("ord", [2.0, 1.0, math.inf, 3.5], ids=ord_id)
def test_norm_fp64_outputs_beyond_float32_range(ord, device):
    """fp64 gradients whose norms exceed float32's range: the float32 outputs
    are inf, the fp64 ones the finite norms (callers that combine norms, such
    as the split and distributed paths, need them)."""
    require_kernel(device)
    tensors = [torch.full((7,), 1e200, dtype=torch.float64, device=device),
               torch.full((3, 2), -3e-5, dtype=torch.float64, device=device),
               torch.full((5,), 2e38, dtype=torch.float32, device=device)]
    total, each = ops.multi_tensor_norm(tensors, ord, True)
    wide_total, wide_each = ops.multi_tensor_norm(tensors, ord, True, True)
    assert total.item() == math.inf and each[0].item() == math.inf
    torch.testing.assert_close(wide_total.cpu(), ref_norm(tensors, ord), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(wide_each.cpu(), ref_norms_each(tensors, ord), rtol=1e-12, atol=0.0)


@device_param
@pytest.mark.parametrize("ord", [0.5, 0.9, 0.001], ids=ord_id)
def test_orders_below_one_keep_norms_just_below_the_double_range(ord, device):
    """With p < 1 the root of a finite power sum can overflow where the norm
    does not (found in review: one fp64 value a few ulps below the largest
    double had an inf norm at p = 0.5, from the root's rounding, and clip_
    zeroed it)."""
    require_kernel(device)
    top = sys.float_info.max
    near = top * (1 - 2.0**-50)
    f64 = {"dtype": torch.float64, "device": device}
    # (tensors, total norm, per-tensor norms); every root computed directly
    # would overflow (the references too), so the norms are written out.
    cases = [([torch.tensor([near], **f64)], near, [near])]
    if ord >= 0.5:  # 3 adds about 1e-154 relative: the norm rounds to near
        cases.append(([torch.tensor([3.0], **f64), torch.tensor([near], **f64)], near, [3.0, near]))
    if ord == 0.5:  # (2 sqrt(top / 4))^2 = top exactly
        cases += [([torch.tensor([top / 4, top / 4], **f64)], top, [top]),
                  ([torch.tensor([top / 4], **f64), torch.tensor([top / 4], **f64)], top, [top / 4, top / 4])]
    for tensors, norm, each in cases:
        wide_total, wide_each = ops.multi_tensor_norm(tensors, ord, True, True)
        assert wide_total.item() == pytest.approx(norm, rel=1e-13)
        assert wide_each.tolist() == pytest.approx(each, rel=1e-13)
        before = [t.clone() for t in tensors]
        ops.clip_(tensors, 1.0, ord)
        for t, b in zip(tensors, before):
            torch.testing.assert_close(t, b / norm, rtol=1e-13, atol=0.0)


# (dtype, smallest and largest binary exponent of the values) over all
# their values; fp64 subnormals only for orders whose rescue cannot lose
# them (a rescue never scales by less than the smallest normal double, so
# subnormal fp64 data has a norm of 0 for a large p).
POWER_RANGES = [(torch.float64, -1074, 1023), (torch.float32, -149, 127), (torch.bfloat16, -133, 127),
                (torch.float16, -24, 15)]
GENERAL_ORDERS = [0.01, 0.5, 1.5, 3.5, 7.25, 100.0, 1500.0]
# Power sums outside [2^-960, inf) are recomputed scaled by max |x| (see
# numerics.h), which makes a one-element norm exactly |x| and hides the
# power: the checked terms stay inside, and a call holds few enough of
# them that their total cannot overflow (8 * 2^1020 < 2^1024).
UNRESCUED_EXPONENTS = (-950.0, 1020.0)
TERMS_PER_CALL = 8


@device_param
@pytest.mark.parametrize("ord", GENERAL_ORDERS, ids=ord_id)
@pytest.mark.parametrize("dtype,lo,hi", POWER_RANGES, ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else "")
def test_general_order_powers_are_accurate_over_the_whole_range(dtype, lo, hi, ord, device):
    """A general p sums |x|^p, which the CPU computes as 2^(p log2 |x|) with
    its own polynomials. The norm of one element is |x| itself: from the
    float64 outputs, within 2^-50 (8 + |log2 x|) relative (the rounding of
    p log2 |x|, whose error the root divides by p), times 1/p for p < 1
    (the root's power multiplies it). Every term whose power sum is not
    rescued is checked, those with powers between 2^1000 and 2^1020 (built
    in two steps) among them."""
    require_kernel(device)
    if dtype == torch.float64 and ord > 7.25:
        lo = -1022
    gen = torch.Generator().manual_seed(31)
    count = 3000
    exps = torch.linspace(lo, hi, count, dtype=torch.float64)
    mantissas = 1.0 + torch.rand(count, generator=gen, dtype=torch.float64)
    large_powers = torch.exp2(torch.linspace(1001.0, 1019.0, 50, dtype=torch.float64) / ord)
    values = torch.cat([torch.exp2(exps) * mantissas, large_powers]).to(dtype)
    values = values[(values != 0) & values.isfinite()]
    values[::2] = -values[::2]
    x = values.double().abs()
    exponent = ord * x.log2()
    unrescued = (exponent > UNRESCUED_EXPONENTS[0]) & (exponent < UNRESCUED_EXPONENTS[1])
    if 1019.0 / ord < hi:  # powers above 2^1000 are reachable in this dtype
        assert (exponent[unrescued] > 1000).any()
    picked = values[unrescued]
    each = torch.cat([
        ops.multi_tensor_norm([v.reshape(1).to(device) for v in picked[i:i + TERMS_PER_CALL]], ord, True, True)[1].cpu()
        for i in range(0, picked.numel(), TERMS_PER_CALL)])
    assert picked.numel() > 40
    x = picked.double().abs()
    bound = 2.0**-50 * (8.0 + x.log2().abs()) * max(1.0, 1.0 / ord)
    rel = (each - x).abs() / x
    assert (rel <= bound).all(), f"worst {rel.max().item():.3g} at {x[rel.argmax()].item():.17g}"
    # Longer tensors (rescued or not) against the float64 reference, and the
    # values that are no power: 0, inf and NaN.
    tensors = [values[i:i + 257].to(device) for i in range(0, values.numel(), 257)]
    _, each = ops.multi_tensor_norm(tensors, ord, True, True)
    torch.testing.assert_close(each.cpu(), ref_norms_each(tensors, ord), rtol=1e-12, atol=0.0)
    special = [torch.tensor(v, dtype=dtype, device=device).reshape(1) for v in (0.0, -math.inf, math.nan)]
    _, each = ops.multi_tensor_norm(special + [torch.tensor([0.0, -3.0], dtype=dtype, device=device)], ord, True, True)
    assert each[0].item() == 0.0 and each[1].item() == math.inf and math.isnan(each[2].item())
    assert each[3].item() == pytest.approx(3.0, rel=1e-14)


@device_param
@ord_param
def test_norm_mixed_dtypes(ord, device):
    require_kernel(device)
    tensors = make_grads([(33,), (4, 7), (129,), (2, 3, 5)], DTYPES, device, seed=20)
    tensors.append(gapped_view((5, 6), torch.bfloat16, device, seed=21))
    tensors.append(offset_view(17, torch.float16, device, seed=22))
    total, each = ops.multi_tensor_norm(tensors, ord, True)
    assert_norm_close(total, ref_norm(tensors, ord))
    assert_norm_close(each, ref_norms_each(tensors, ord))


@device_param
@ord_param
@dtype_param
def test_norm_10000_small_tensors(dtype, ord, device):
    """10,000 tensors in every dtype and order (fp32 at order 2 alone
    before: found in review), a 0-size one every 997th."""
    require_kernel(device)
    rng = random.Random(30)
    sizes = [0 if i % 997 == 0 else rng.randint(64, 4096) for i in range(10_000)]
    flat = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(31)).to(dtype)
    # Copies: on the CPU, split views of flat would be clipped along with it.
    tensors = [t.to(device, copy=True) for t in torch.split(flat, sizes)]
    poison_allocator([1] * 4 + [len(tensors)] * 4, device)
    ref = ref_norm([flat], ord)  # cascade sums: vector_norm's fp64 sum was 2.9e-13 off here
    total, each = ops.multi_tensor_norm(tensors, ord, True)
    assert_norm_close(total, ref, dtype)
    assert_norm_close(each, ref_norms_each(tensors, ord), dtype)

    max_norm = 0.5 * total.item()
    norm = ops.clip_(tensors, max_norm, ord)
    assert_same_bits(norm, total)
    assert_scaled_close(torch.cat([t.cpu() for t in tensors]), ref_scaled(flat, ref_coef(max_norm, ref)))


@device_param
@ord_param
def test_lists_of_only_empty_tensors(ord, device):
    """Only 0-size tensors, of every dtype: norm 0, per-tensor norms 0, a
    clip that writes nothing; the API as torch (zero norm)."""
    require_kernel(device)
    tensors = [torch.empty(shape, dtype=dtype, device=device)
               for shape, dtype in zip([(0,), (3, 0), (0, 5, 2), (0,)], DTYPES)]
    total, each = ops.multi_tensor_norm(tensors, ord, True)
    assert total.item() == 0.0 and each.tolist() == [0.0] * len(tensors)
    assert ops.clip_(tensors, 1.0, ord).item() == 0.0
    ops.multi_tensor_scale_(tensors, torch.tensor(0.5))
    params = make_params(tensors)
    assert fastclip.clip_grad_norm_(params, 1.0, ord).item() == 0.0
    total, each = fastclip.grad_norms(params, ord)
    assert total.item() == 0.0 and each.tolist() == [0.0] * len(tensors)
    assert all(p.grad.numel() == 0 for p in params)


# ------------------------------------------------------------------- scale
@device_param
@pytest.mark.parametrize("coef", [0.5, 0.3])
@dtype_param
@case_param
def test_scale_matches_reference(case, dtype, coef, device):
    require_kernel(device)
    tensors, gaps = CASES[case](dtype, device)
    gap_copies = _fill_gaps(gaps, SENTINEL)
    coef_t = torch.tensor(coef)  # float32, as the Python API may pass it
    expected = [ref_scaled(t, coef_t) for t in tensors]

    ops.multi_tensor_scale_(tensors, coef_t)

    for t, e in zip(tensors, expected):
        assert_scaled_close(t, e)
    _assert_gaps_kept(gaps, gap_copies)


@device_param
@dtype_param
@case_param
def test_scale_by_exactly_one_writes_nothing(case, dtype, device):
    require_kernel(device)
    tensors, gaps = CASES[case](dtype, device)
    gap_copies = _fill_gaps(gaps, SENTINEL)
    before = snapshot(tensors)
    for coef in (torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64), torch.ones(1, dtype=torch.float16)):
        ops.multi_tensor_scale_(tensors, coef)
    assert_untouched(tensors, before)  # values and _version
    _assert_gaps_kept(gaps, gap_copies)


@device_param
@dtype_param
def test_scale_coef_float64_tensor(dtype, device):
    require_kernel(device)
    tensors = make_grads([(), (17,), (5, 9)], dtype, device, seed=40) + [gapped_view((4, 3), dtype, device)]
    coef = torch.tensor(1.0 / 3.0, dtype=torch.float64)
    expected = [ref_scaled(t, coef) for t in tensors]
    ops.multi_tensor_scale_(tensors, coef)
    for t, e in zip(tensors, expected):
        assert_scaled_close(t, e)


# Coefficients below float32's normal range (2^-126): a clip by a norm
# above 2^126 times max_norm. float32 would keep 12 bits of 3.3e-42.
TINY_COEFS = [1e-39, 3.3e-42, -7e-44, 2.0**-149, 2.0**-126]


@pytest.mark.parametrize("impl", ["op", "fallback"])
@device_param
@pytest.mark.parametrize("coef", TINY_COEFS)
@dtype_param
def test_scale_by_a_coefficient_below_float_normals(dtype, coef, device, impl):
    """Data computed in float32 is scaled in double and rounded once where
    the coefficient is below float32's normal range (found in review: fp32
    gradients of norm 3e41 clipped 1e-4 off); AVX and views included."""
    if impl == "op":
        require_kernel(device)
    scale = ops.multi_tensor_scale_ if impl == "op" else _fallback.multi_tensor_scale_
    big = torch.tensor([3e38, -2.5e38, 1e30, 7.0, 0.0, -0.0, math.nan, math.inf], dtype=torch.float64)
    tensors = [(t.double() * 1e36).to(dtype) for t in make_grads([(1031,), (5, 33)], dtype, device, seed=42)]
    tensors += [big.to(dtype).to(device), gapped_view((4, 3), dtype, device).mul_(1e30)]
    coef_t = torch.tensor(coef, dtype=torch.float64)
    expected = [ref_scaled(t, coef_t) for t in tensors]
    scale(tensors, coef_t)
    for t, e in zip(tensors, expected):
        assert_scaled_close(t, e)


def test_clip_by_a_norm_above_float_normals_is_exact():
    """The fused clip, the split path and the fallback on fp32 gradients
    whose norm's reciprocal is below float32's normal range: each element
    is the float64 product rounded once, within an ulp (the coefficient
    comes from the kernel's float64 norm; float32 arithmetic was 1.5e-6
    and 1e-4 off here)."""
    for n, value in ((100, 1e38), (10**6, 3e38)):
        exact = math.sqrt(n) * float(torch.tensor(value))
        coef = 1.0 / (exact + 1e-6)
        for how in ("fused", "tensor max_norm", "fallback"):
            grad = torch.full((n,), value)
            params = make_params([grad])
            if how == "fallback":
                _fallback.multi_tensor_scale_([params[0].grad], torch.tensor(coef, dtype=torch.float64))
            else:
                max_norm = 1.0 if how == "fused" else torch.tensor(1.0)
                norm = fastclip.clip_grad_norm_(params, max_norm)
                assert math.isinf(norm.item())  # beyond float32, as documented
            want = (grad.double() * coef).float()
            torch.testing.assert_close(params[0].grad, want, rtol=2.0**-23, atol=0.0, msg=f"{how} n={n}")


@device_param
def test_scale_mixed_dtypes(device):
    require_kernel(device)
    tensors = make_grads([(33,), (4, 7), (129,), (2, 3, 5)], DTYPES, device, seed=41)
    coef = torch.tensor(0.7, dtype=torch.float64)
    expected = [ref_scaled(t, coef) for t in tensors]
    ops.multi_tensor_scale_(tensors, coef)
    for t, e in zip(tensors, expected):
        assert_scaled_close(t, e)


# ------------------------------------------------------------------- clamp
@device_param
@pytest.mark.parametrize("clip_value", [0.5, 0.3, 0.0])
@dtype_param
@case_param
def test_clamp_matches_torch(case, dtype, clip_value, device):
    require_kernel(device)
    tensors, gaps = CASES[case](dtype, device)
    gap_copies = _fill_gaps(gaps, SENTINEL)
    for t in tensors:
        if t.numel() > 0:
            t[(0,) * t.dim()] = math.nan
            t[tuple(s - 1 for s in t.shape)] = -math.inf if t.numel() > 1 else math.nan
    # torch's CPU clamp as the reference on every device: for clip_value 0
    # it gives -0.0 to negative inputs, where a device's fminf/fmaxf may
    # return either zero (IEEE 754 leaves it open); the kernels must not.
    expected = [torch.clamp(t.cpu(), -clip_value, clip_value) for t in tensors]

    ops.multi_tensor_clamp_(tensors, clip_value)

    for t, e in zip(tensors, expected):
        assert_identical(t.cpu(), e)
    _assert_gaps_kept(gaps, gap_copies)


@device_param
def test_clamp_mixed_dtypes(device):
    require_kernel(device)
    tensors = make_grads([(33,), (4, 7), (129,), (2, 3, 5)], DTYPES, device, seed=42, scale=3.0)
    tensors[2][5] = math.nan
    expected = [torch.clamp(t, -1.25, 1.25) for t in tensors]
    ops.multi_tensor_clamp_(tensors, 1.25)
    for t, e in zip(tensors, expected):
        assert_identical(t, e)


# ------------------------------------------------------------ fused clip_
@device_param
@ord_param
@dtype_param
@case_param
def test_clip_matches_reference(case, dtype, ord, device):
    require_kernel(device)
    tensors, gaps = CASES[case](dtype, device)
    gap_copies = _fill_gaps(gaps, SENTINEL)
    norm = ref_norm(tensors, ord)
    max_norm = 0.4 * norm.item()
    expected = [ref_scaled(t, ref_coef(max_norm, norm)) for t in tensors]
    poison_allocator([1], device)

    total = ops.clip_(tensors, max_norm, ord)

    assert total.shape == () and total.device.type == device
    assert_norm_close(total, norm, dtype)
    for t, e in zip(tensors, expected):
        assert_scaled_close(t, e)
    _assert_gaps_kept(gaps, gap_copies)


@device_param
@ord_param
@dtype_param
def test_clip_below_max_norm_writes_nothing(dtype, ord, device):
    require_kernel(device)
    tensors, gaps = _gaps(dtype, device)
    gap_copies = _fill_gaps(gaps, SENTINEL)
    before = snapshot(tensors)
    norm = ref_norm(tensors, ord)
    total = ops.clip_(tensors, 2.0 * norm.item() + 1.0, ord)
    assert_norm_close(total, norm, dtype)
    if device == "cpu":
        assert_untouched(tensors, before)
    else:
        # The coefficient is decided on the device: the glue bumps the
        # versions of what the launch may have written (README, Ops).
        for i, (t, (copy, version)) in enumerate(zip(tensors, before)):
            assert t._version > version, f"tensors[{i}]"
            assert_same_bits(t, copy)
    _assert_gaps_kept(gaps, gap_copies)


@device_param
@ord_param
def test_clip_mixed_dtypes(ord, device):
    require_kernel(device)
    tensors = make_grads([(33,), (4, 7), (129,), (2, 3, 5)], DTYPES, device, seed=43)
    norm = ref_norm(tensors, ord)
    max_norm = 0.3 * norm.item()
    expected = [ref_scaled(t, ref_coef(max_norm, norm)) for t in tensors]
    total = ops.clip_(tensors, max_norm, ord)
    assert_norm_close(total, norm)
    for t, e in zip(tensors, expected):
        assert_scaled_close(t, e)


# ---------------------------------------------------------- determinism
def _million(dtype, device="cpu"):
    sizes = [2**19 + 3, 2**18 - 5, 123_457, 65_536, 1, 7, 99_999]  # 1,075,430 elements
    return make_grads([(n,) for n in sizes], dtype, device, seed=50)


@device_param
@pytest.mark.parametrize("ord", [2.0, 3.5], ids=ord_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_norm_is_bitwise_deterministic(dtype, ord, device):
    require_kernel(device)
    tensors = _million(dtype, device)
    first_total, first_each = ops.multi_tensor_norm(tensors, ord, True)
    for _ in range(9):
        total, each = ops.multi_tensor_norm(tensors, ord, True)
        assert_same_bits(total, first_total)
        assert_same_bits(each, first_each)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
def test_norm_and_clip_bits_do_not_depend_on_thread_count(dtype):
    # Threads take pieces of the chunk list in no fixed order; partials are
    # reduced in chunk order, so every thread count gives the same bits.
    # A few multi-chunk tensors among many small ones, so that pieces end
    # inside tensors and some pieces hold no chunk start.
    tensors = _million(dtype) + make_grads([(n,) for n in range(1, 400, 7)], dtype, seed=51)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 8):
            torch.set_num_threads(count)
            total, each = ops.multi_tensor_norm(tensors, 2.0, True)
            clipped = [t.clone() for t in tensors]
            clip_total = ops.clip_(clipped, float(total) / 3, 2.0)
            results.append((total, each, clip_total, clipped))
    finally:
        torch.set_num_threads(threads)
    first = results[0]
    for total, each, clip_total, clipped in results[1:]:
        assert_same_bits(total, first[0])
        assert_same_bits(each, first[1])
        assert_same_bits(clip_total, first[2])
        for a, b in zip(clipped, first[3]):
            assert_same_bits(a, b)
    assert not torch.equal(first[3][0], tensors[0])  # the clip did scale


def _lane_model_sum(values: list, bf16_pairs: bool, ord: float) -> float:
    """A chunk's float64 power sum as the CPU kernels document it (spans.cpp,
    README Design): 32 lanes; in each whole block of 32 elements, element j
    goes to lane j (bf16: element 2w to lane w, 2w + 1 to lane w + 16); the
    tail's k-th element to lane k; each lane sums in element order; the
    lanes fold by halves (lane l += lane l + width, width 16 down to 1)."""
    def term(v):
        return abs(v) if ord == 1.0 else v * v  # squares of 16/32-bit values are exact in double

    lanes = [0.0] * 32
    whole = len(values) - len(values) % 32
    for start in range(0, whole, 32):
        for j in range(32):
            lane = (j // 2 + 16 * (j % 2)) if bf16_pairs else j
            lanes[lane] += term(values[start + j])
    for k, v in enumerate(values[whole:]):
        lanes[k] += term(v)
    width = 16
    while width:
        for lane in range(width):
            lanes[lane] += lanes[lane + width]
        width //= 2
    return lanes[0]


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
@pytest.mark.parametrize("ord", [1.0, 2.0], ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_norm_sums_in_the_documented_lane_order(dtype, ord, flush):
    """The CPU's float64 sums follow one order on every path (portable loops
    per ISA level, F16C for fp16, AVX-512 for bf16 order 1; the last two not
    taken when the thread flushes denormals): bitwise the model's, at both
    element alignments, with values whose sums depend on their order."""
    gen = torch.Generator().manual_seed(77)
    n = 32 * 100 + 13  # one chunk, whole blocks and a tail
    # Exponents wide enough that float64 sums round (fp16's range is too
    # narrow for that at order 1: any order gives its exact sum).
    span = {torch.float16: 13.0, torch.float64: 300.0}.get(dtype, 60.0)
    magnitudes = torch.exp2(torch.empty(n + 1, dtype=torch.float64).uniform_(-span, span, generator=gen))
    signs = torch.randint(0, 2, (n + 1,), generator=gen).double() * 2 - 1
    base = (magnitudes * signs).to(dtype)
    if not torch.set_flush_denormal(flush) and flush:
        pytest.skip("this CPU cannot flush denormals")
    try:
        results = [ops.multi_tensor_norm([base[offset:offset + n]], ord, False, True)[0].item() for offset in (0, 1)]
    finally:
        torch.set_flush_denormal(False)
    for offset, result in zip((0, 1), results):
        values = base[offset:offset + n].double().tolist()
        acc = _lane_model_sum(values, dtype == torch.bfloat16, ord)
        expected = acc if ord == 1.0 else math.sqrt(acc)
        assert result == expected, (offset, result, expected, result - expected)


# Probes of the lane order: a huge term h at one position of a block and
# terms s at two others, with s**p 0.5625 of the float64 ulp of h**p: two
# such terms that meet before h survive as one ulp, and two that meet h
# one after the other as two, so the fold's pairing of lanes shows in the
# result. (Sums of random data, as above, show a misplaced pair of lane
# vectors in 10-40% of draws, and not with that test's seed; found
# planting one in the AVX2 bf16 kernel.)
# (dtype, ord) -> (log2 h, s); fp16 has no s for order 1: its order-1 sums
# are exact whatever the order.
LANE_PROBES = {
    (torch.float32, 1.0): (60, 1.125 * 2.0**7), (torch.float32, 2.0): (60, 1.5 * 2.0**33),
    (torch.float64, 1.0): (60, 1.125 * 2.0**7), (torch.float64, 2.0): (60, 1.5 * 2.0**33),
    (torch.bfloat16, 1.0): (60, 1.125 * 2.0**7), (torch.bfloat16, 2.0): (60, 1.5 * 2.0**33),
    (torch.float16, 2.0): (15, 1.5 * 2.0**-12),
}


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
@pytest.mark.parametrize("dtype,ord", list(LANE_PROBES), ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else ord_id(v))
def test_cpu_norm_lanes_probed_position_by_position(dtype, ord, flush):
    """Every position of a block against the lane model, as per-tensor norms
    of one call: 1,500 probes (h at one position, s at two others) of one
    block each, starting at an even and an odd element."""
    log2_h, small = LANE_PROBES[(dtype, ord)]
    rng = random.Random(5)
    probes = []
    for _ in range(1500):
        q, p1, p2 = rng.sample(range(32), 3)
        values = [0.0] * 32
        values[q], values[p1], values[p2] = 2.0**log2_h, small, small
        probes.append(values)
    buf = torch.zeros(len(probes) * 33 + 1, dtype=dtype)
    tensors = []
    for k, values in enumerate(probes):
        start = 33 * k  # even and odd starting elements (found in review: 33k + k % 2 is always even)
        buf[start:start + 32] = torch.tensor(values, dtype=torch.float64).to(dtype)
        tensors.append(buf[start:start + 32])
    assert all(t.tolist() == v for t, v in zip(tensors, probes))  # every term exact in the dtype
    assert {t.storage_offset() % 2 for t in tensors} == {0, 1}
    if not torch.set_flush_denormal(flush) and flush:
        pytest.skip("this CPU cannot flush denormals")
    try:
        _, each = ops.multi_tensor_norm(tensors, ord, True, True)
    finally:
        torch.set_flush_denormal(False)
    expected = [_lane_model_sum(v, dtype == torch.bfloat16, ord) for v in probes]
    expected = torch.tensor([e if ord == 1.0 else math.sqrt(e) for e in expected], dtype=torch.float64)
    wrong = (each != expected).nonzero().flatten().tolist()
    assert not wrong, [(probes[k].index(2.0**log2_h), [j for j, v in enumerate(probes[k]) if v == small]) for k in wrong[:5]]
    # The probes tell pairings apart: the model itself gives two results.
    assert len(set(expected.tolist())) == 2


@pytest.mark.parametrize("ord", [2.0, 3.5], ids=ord_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_caller_flush_denormal_mode_applies_to_every_chunk(dtype, ord):
    # torch.set_flush_denormal sets the calling thread's mode only. Every
    # chunk must run in the caller's mode, whichever thread takes it, so
    # results repeat and match one thread: here subnormal inputs read as 0.
    tensors = [torch.full((2**16,), 1e-39, dtype=dtype) for _ in range(64)]  # one chunk each
    threads = torch.get_num_threads()
    ops.multi_tensor_norm(tensors, ord, True)  # the worker threads exist before the mode is set
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        norms = [ops.multi_tensor_norm(tensors, ord, True)[1] for _ in range(10)]
        scaled = [t.clone() for t in tensors]
        ops.multi_tensor_scale_(scaled, torch.tensor(0.5))
        torch.set_num_threads(1)
        single = ops.multi_tensor_norm(tensors, ord, True)[1]
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert torch.equal(single, torch.zeros(64))
    for each in norms:
        assert_same_bits(each, single)
    assert all(torch.equal(t.float(), torch.zeros(2**16)) for t in scaled)
    # Back in the default mode the same call sees the subnormals.
    assert (ops.multi_tensor_norm(tensors, ord, True)[1] > 0).all()


@pytest.mark.parametrize("op", ["scale", "clamp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_views_with_gaps_written_in_the_callers_denormal_mode(dtype, op):
    # A view with gaps is written through a contiguous copy by the same
    # kernels, in the caller's mode; ATen's own threads would not have it.
    n = 400_000  # several threads' worth
    dense = torch.full((n,), 1e-39, dtype=dtype)
    base = torch.full((2 * n,), 1e-39, dtype=dtype)
    view = base[::2]
    call = (lambda ts: ops.multi_tensor_scale_(ts, torch.tensor(0.5))) if op == "scale" else (
        lambda ts: ops.multi_tensor_clamp_(ts, 1e-40))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    if not torch.set_flush_denormal(True):
        torch.set_num_threads(threads)
        pytest.skip("this CPU cannot flush denormals")
    try:
        call([dense, view])
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert torch.equal(dense.float(), torch.zeros(n))  # subnormals read as zero
    assert_same_bits(view, dense)
    assert_same_bits(base[1::2], torch.full((n,), 1e-39, dtype=dtype))  # the gaps


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_scale_of_views_with_gaps_matches_dense_bits(dtype):
    # Views with gaps are scaled through a contiguous copy (CPU) or their
    # strides (CUDA), dense tensors in place: the same coefficient must give
    # the same bits, float32 product and one rounding for 16-bit dtypes.
    gen = torch.Generator().manual_seed(63)
    for _ in range(20):
        base = (torch.randn(64, 3, generator=gen, dtype=torch.float64) * 10).to(dtype)
        view, dense = base[:, 0], base[:, 0].clone()
        before = dense.clone()
        coef = torch.rand((), generator=gen, dtype=torch.float64) * 0.999  # not a float32 value
        ops.multi_tensor_scale_([view], coef)
        ops.multi_tensor_scale_([dense], coef)
        assert_same_bits(view, dense)
        if dtype in (torch.float16, torch.bfloat16):  # opmath: float32 product, one rounding
            assert_same_bits(dense, (before.float() * coef.float()).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_data_not_aligned_to_its_element_size(dtype):
    # torch.frombuffer can place a tensor at any byte: the CPU kernels read
    # and write it (no aligned vector access after a peeled head) and give
    # the bits of an aligned copy. 100,003 elements: more than a chunk.
    numel, size = 100_003, torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(64)
    values = (torch.randn(numel, generator=gen, dtype=torch.float64) * 4).to(dtype)
    for byte in range(1, size):
        buf = bytearray(numel * size + size)
        odd = torch.frombuffer(buf, dtype=dtype, offset=byte, count=numel)
        assert odd.data_ptr() % size == byte
        odd.copy_(values)
        even = values.clone()
        for ord in ORDS:
            for a, b in zip(ops.multi_tensor_norm([odd], ord, True), ops.multi_tensor_norm([even], ord, True)):
                assert_same_bits(a, b)
        assert_same_bits(ops.clip_([odd], 1.0, 2.0), ops.clip_([even], 1.0, 2.0))
        assert_same_bits(odd, even)
        ops.multi_tensor_clamp_([odd], 0.001)
        ops.multi_tensor_clamp_([even], 0.001)
        assert_same_bits(odd, even)
        assert buf[:byte] == bytearray(byte) and buf[byte + numel * size :] == bytearray(size - byte)


BF16_EXPONENT = 0x7F80
BF16_2_TO_64 = 0x5F80  # the exponent field of 2^64
FP16_EXPONENT = 0x7C00
KERNEL_BLOCK = 64  # elements: more than one block of the CPU kernels' 32 lanes, or a CUDA 16-byte vector


def _every_bf16(offset: int, below_2_to_64: bool = False) -> torch.Tensor:
    """Every bfloat16 bit pattern (or every one below 2^64 in magnitude, whose
    norms fit float32) but the last five (an odd length, and a tail after
    whole vectors), at an element offset into its buffer: the CPU kernels
    read bf16 as pairs from the view's start."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    if below_2_to_64:
        bits = bits[(bits & BF16_EXPONENT) < BF16_2_TO_64]
    bits = bits[:-5]
    length = bits.numel()
    buf = torch.empty(length + offset, dtype=torch.bfloat16)
    buf.view(torch.int16)[offset:].copy_(bits)
    return buf[offset:]


def _assert_bf16_same_values(actual, expected):
    """Same bits, except that a NaN need only be a NaN (torch's rounding makes
    every NaN one canonical NaN; fastclip keeps sign and payload)."""
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan())
    assert torch.equal(actual.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
@pytest.mark.parametrize("offset", [0, 1])
def test_bf16_every_value_scale_and_clamp(offset, flush):
    # Subnormal results, overflow to inf, ties to even, NaN and inf inputs;
    # on AVX512-BF16 CPUs both the hardware rounding and, for vectors with
    # subnormal results or when the thread flushes denormals, the portable
    # one. The reference is computed in the same mode, all on this thread
    # (set_flush_denormal sets the mode of the calling thread only).
    threads = torch.get_num_threads()
    if not torch.set_flush_denormal(flush):
        pytest.skip("this CPU cannot flush denormals")
    if flush:
        torch.set_num_threads(1)
    try:
        for coef in (0.3, 0.5, 1.7e-8, 3.3e30, -1.0):
            x = _every_bf16(offset)
            expected = (x.float() * torch.tensor(coef).float()).to(torch.bfloat16)
            ops.multi_tensor_scale_([x], torch.tensor(coef, dtype=torch.float64))
            _assert_bf16_same_values(x, expected)
        for bound in (1e-5, 3.0, 1e-39):
            x = _every_bf16(offset)
            expected = x.float().clamp(-bound, bound).to(torch.bfloat16)
            ops.multi_tensor_clamp_([x], bound)
            _assert_bf16_same_values(x, expected)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
def test_bf16_every_value_norm(ord):
    # Every bf16 value below 2^64 (subnormals included) at both alignments:
    # exact against float64, and the same bits whatever the address of the
    # first element.
    norms = []
    for offset in (0, 1):
        x = _every_bf16(offset, below_2_to_64=True)
        assert x.storage_offset() == offset and x.numel() > 40000
        norms.append(ops.multi_tensor_norm([x], ord, False)[0])
        assert_norm_close(norms[-1], ref_norm([x], ord))
    assert_same_bits(norms[0], norms[1])
    with_inf_nan = ops.multi_tensor_norm([_every_bf16(1)], ord, False)[0]
    assert with_inf_nan.isnan()


def _every_fp16(offset: int, finite: bool) -> torch.Tensor:
    """Every fp16 bit pattern (every finite one when ``finite``) but the last
    five (an odd length: a tail after whole vectors), at an element offset."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    if finite:
        bits = bits[(bits & FP16_EXPONENT) != FP16_EXPONENT]
    bits = bits[:-5]
    buf = torch.empty(bits.numel() + offset, dtype=torch.float16)
    buf.view(torch.int16)[offset:].copy_(bits)
    return buf[offset:]


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
def test_fp16_every_value_norm(ord):
    # As test_bf16_every_value_norm, for fp16 (the F16C path): exact against
    # float64 for every finite value, the same bits at both alignments, and
    # NaN once NaN and inf are in (found in review: an fp16 kernel that
    # dropped NaN passed every test).
    norms = []
    for offset in (0, 1):
        x = _every_fp16(offset, finite=True)
        assert x.isfinite().all() and x.numel() > 60000
        norms.append(ops.multi_tensor_norm([x], ord, False)[0])
        assert_norm_close(norms[-1], ref_norm([x], ord), torch.float16)
    assert_same_bits(norms[0], norms[1])
    assert ops.multi_tensor_norm([_every_fp16(1, finite=False)], ord, False)[0].isnan()


NONFINITE_LENGTH = 3 * KERNEL_BLOCK + 13  # whole blocks, then a tail


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_at_every_position_of_blocks_and_tail(value, dtype, ord):
    # One non-finite element at each position, in its own tensor: every
    # lane of the vector bodies and every element of the scalar tail must
    # carry it into the tensor's norm and the total (found in review: the
    # tests' NaN only ever landed in short tails).
    base = make_grads([(NONFINITE_LENGTH,)], dtype, seed=63)[0]
    tensors = []
    for position in range(NONFINITE_LENGTH):
        x = base.clone()
        x[position] = value
        tensors.append(x)
    total, each = ops.multi_tensor_norm(tensors, ord, True)
    for norm in (*each, total):
        if math.isnan(value):
            assert norm.isnan(), each
        else:
            assert norm.item() == math.inf, each


def _fp16_edge_values(n=1003, seed=62):
    """fp16 values with subnormals, the largest finite value, zeros and a
    length that leaves a tail after whole vectors."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=gen) * 300).half()
    x[::7] = torch.tensor(6e-8).half()  # the smallest subnormal
    x[1::11] = torch.tensor(-3.1e-5).half()  # a larger subnormal
    x[5] = 65504.0
    x[9] = 0.0
    return x


def test_fp16_paths_agree_with_and_without_flushed_denormals():
    # fp16 runs through the F16C conversion instructions unless the thread
    # flushes denormals (MXCSR DAZ/FTZ), and then through the portable
    # conversion, whose results do not depend on that mode. Both must give
    # the exact references, computed here before any mode change.
    x = _fp16_edge_values()
    ref = {ord: ref_norm([x], ord) for ord in (2.0, 1.0, math.inf)}
    ref_scale = (x.float() * 0.3).half()
    ref_clamp = x.clamp(-1e-5, 1e-5)
    results = {}
    for flush in (False, True):
        if not torch.set_flush_denormal(flush):
            pytest.skip("this CPU cannot flush denormals")
        try:
            norms = {ord: ops.multi_tensor_norm([x], ord, False)[0] for ord in ref}
            scaled, clamped = x.clone(), x.clone()
            ops.multi_tensor_scale_([scaled], torch.tensor(0.3))
            ops.multi_tensor_clamp_([clamped], 1e-5)
        finally:
            torch.set_flush_denormal(False)
        for ord, norm in norms.items():
            assert_norm_close(norm, ref[ord], torch.float16)
        assert torch.equal(scaled.view(torch.int16), ref_scale.view(torch.int16)), f"flush={flush}"
        assert torch.equal(clamped.view(torch.int16), ref_clamp.view(torch.int16)), f"flush={flush}"
        results[flush] = norms
    for ord in ref:
        assert_same_bits(results[False][ord], results[True][ord])


# -------------------------------------------------------------- opcheck
def _opcheck_tensors(device):
    return make_grads([(3,), (2, 5), (0,), ()], torch.float32, device, seed=60) + [
        make_grads([(4, 6)], torch.bfloat16, device, seed=61)[0].t()
    ]


@pytest.mark.parametrize(
    "op, extra",
    [
        (ops.multi_tensor_norm.default, (2.0, True)),
        (ops.multi_tensor_norm.default, (3.5, False)),
        (ops.multi_tensor_norm.default, (2.0, True, True)),
        (ops.multi_tensor_scale_.default, (torch.tensor(0.25),)),
        (ops.multi_tensor_clamp_.default, (0.5,)),
        (ops.multi_tensor_norm.default, (math.inf, True)),
        (ops.multi_tensor_scale_.default, (torch.tensor(1.0),)),
        (ops.clip_.default, (0.5, 2.0)),
        (ops.clip_.default, (0.5, 1.0, True)),
        (ops.clip_.default, (1e9, math.inf, True)),
    ],
    ids=["norm_per_tensor", "norm_total", "norm_fp64", "norm_inf", "scale_", "scale_one", "clamp_", "clip_",
         "clip_error_if_nonfinite", "clip_no_write"],
)
@device_param
def test_opcheck(op, extra, device):
    require_kernel(device)
    torch.library.opcheck(op, ([t.clone() for t in _opcheck_tensors(device)], *extra))


# --------------------------------------------------- negative controls
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_negative_control_norm_check_can_fail(dtype):
    tensors = make_grads([(64,), (5, 7)], dtype, "cpu", seed=70)
    total, _ = ops.multi_tensor_norm(tensors, 2.0, False)
    norm = ref_norm(tensors, 2.0)
    assert_norm_close(total, norm, dtype)
    # Two float32 ulps off (at most 2**-22 relative) is already too far.
    with pytest.raises(AssertionError):
        assert_norm_close(total, norm * (1 + 2 * TOLERANCES[dtype].norm_rtol), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_negative_control_scaled_check_can_fail(dtype):
    t = make_grads([(257,)], dtype, "cpu", seed=71)[0]
    expected = ref_scaled(t, 0.5)
    ops.multi_tensor_scale_([t], torch.tensor(0.5))
    assert_scaled_close(t, expected)
    # One element off by one ulp of its dtype (fp64: by 3x its tolerance).
    wrong = expected.clone()
    if dtype == torch.float64:
        wrong[100] *= 1 + 3 * TOLERANCES[dtype].scale_rtol
    else:
        wrong.view({4: torch.int32, 2: torch.int16}[wrong.element_size()])[100] += 1
    assert not torch.equal(wrong, expected)
    with pytest.raises(AssertionError):
        assert_scaled_close(t, wrong)


def test_negative_control_untouched_check_can_fail():
    t = make_grads([(8,)], torch.float32, "cpu", seed=72)[0]
    before = snapshot([t])
    ops.multi_tensor_scale_([t], torch.tensor(0.5))
    with pytest.raises(AssertionError):
        assert_untouched([t], before)


# ------------------------------------------------------------------ errors
def _error_inputs():
    return make_grads([(5,), (2, 3)], torch.float32, "cpu", seed=80, scale=10.0)


def _with_int64(tensors):
    return [tensors[0], torch.arange(6, dtype=torch.int64).view(2, 3), tensors[1]]


ERRORS = [
    ("norm_ord_0", lambda ts: ops.multi_tensor_norm(ts, 0.0, True), "ord must be a positive"),
    ("norm_ord_-1", lambda ts: ops.multi_tensor_norm(ts, -1.0, True), "ord must be a positive"),
    ("norm_ord_nan", lambda ts: ops.multi_tensor_norm(ts, math.nan, False), "ord must be a positive"),
    ("norm_ord_-inf", lambda ts: ops.multi_tensor_norm(ts, -math.inf, False), "ord must be a positive"),
    ("clip_ord_0", lambda ts: ops.clip_(ts, 1.0, 0.0), "ord must be a positive"),
    ("clip_ord_-2", lambda ts: ops.clip_(ts, 1.0, -2.0), "ord must be a positive"),
    ("clip_ord_nan", lambda ts: ops.clip_(ts, 1.0, math.nan), "ord must be a positive"),
    ("clip_max_norm_-1", lambda ts: ops.clip_(ts, -1.0, 2.0), "max_norm"),
    ("clip_max_norm_nan", lambda ts: ops.clip_(ts, math.nan, 2.0), "max_norm"),
    ("clip_max_norm_inf", lambda ts: ops.clip_(ts, math.inf, 2.0), "max_norm"),
    ("clamp_-1", lambda ts: ops.multi_tensor_clamp_(ts, -1.0), "clip_value"),
    ("clamp_nan", lambda ts: ops.multi_tensor_clamp_(ts, math.nan), "clip_value"),
    ("scale_coef_2_elements", lambda ts: ops.multi_tensor_scale_(ts, torch.tensor([0.5, 0.5])), "coef"),
    ("scale_coef_int", lambda ts: ops.multi_tensor_scale_(ts, torch.tensor(0)), "coef"),
    ("norm_int64", lambda ts: ops.multi_tensor_norm(_with_int64(ts), 2.0, True), r"tensors\[1\].*Long"),
    ("scale_int64", lambda ts: ops.multi_tensor_scale_(_with_int64(ts), torch.tensor(0.5)), r"tensors\[1\].*Long"),
    ("clamp_int64", lambda ts: ops.multi_tensor_clamp_(_with_int64(ts), 0.5), r"tensors\[1\].*Long"),
    ("clip_int64", lambda ts: ops.clip_(_with_int64(ts), 0.5, 2.0), r"tensors\[1\].*Long"),
]


@pytest.mark.parametrize("call, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_op_errors_modify_nothing(call, match):
    tensors = _error_inputs()
    before = snapshot(tensors)
    with pytest.raises(RuntimeError, match=match):
        call(tensors)
    assert_untouched(tensors, before)


@pytest.mark.skipif(not HAS_CUDA, reason="mixed devices need a CUDA device")
@pytest.mark.parametrize("op", ["norm", "scale", "clamp", "clip"])
def test_op_mixed_devices_error_cuda_and_cpu(op):
    require_kernel("cuda")
    tensors = [torch.randn(5, device="cuda"), torch.randn(3)]
    before = snapshot(tensors)
    call = {
        "norm": lambda: ops.multi_tensor_norm(tensors, 2.0, True),
        "scale": lambda: ops.multi_tensor_scale_(tensors, torch.tensor(0.5)),
        "clamp": lambda: ops.multi_tensor_clamp_(tensors, 0.5),
        "clip": lambda: ops.clip_(tensors, 0.5, 2.0),
    }[op]
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on cpu"):
        call()
    assert_untouched(tensors, before)


@pytest.mark.large
def test_cpu_tensor_beyond_2_pow_31_elements():
    """64-bit sizes and offsets in the CPU driver and kernels: one bf16
    tensor of 2^31 + 5 elements (4 GiB, 32,769 chunks), all ones (so a chunk
    dropped or counted twice changes the sum) but for a few values around
    element 2^31 and at the end. Sums of squares of small integers are
    exact in float64, so the norm is checked to the float32 rounding of the
    exact value and the clip's products bit for bit. Peak memory about
    5 GB."""
    n = 2**31 + 5
    if available_memory_bytes() < 3 * n:
        pytest.skip("needs about 6.5 GB of free memory")
    x = torch.ones(n, dtype=torch.bfloat16)
    specials = {2**31 - 1: 2.0, 2**31: 3.0, 2**31 + 1: 4.0, n - 1: 5.0}
    for index, value in specials.items():
        x[index] = value
    sum_sq = (n - len(specials)) + sum(v * v for v in specials.values())
    expected = torch.tensor(math.sqrt(sum_sq), dtype=torch.float64)

    total, each = ops.multi_tensor_norm([x], 2.0, True)
    assert_norm_close(total, expected, torch.bfloat16)
    assert_norm_close(each[0], expected, torch.bfloat16)
    inf_total, _ = ops.multi_tensor_norm([x], math.inf, False)
    assert inf_total.item() == 5.0

    # Clip to a quarter of the norm: the coefficient is 0.25 to within 1e-6
    # relative, so every product rounds to the same bf16 as times 0.25.
    returned = ops.clip_([x], 0.25 * math.sqrt(sum_sq), 2.0)
    assert_norm_close(returned, expected, torch.bfloat16)
    for index, value in specials.items():
        assert x[index].item() == 0.25 * value, index
    # Compared a slice at a time: a bool tensor of all of x is 2 GiB more,
    # and bool.sum() of it went through int64 (17 GiB).
    step = 2**28
    others = sum(int(x[s : s + step].ne(0.25).count_nonzero()) for s in range(0, n, step))
    assert others == len(specials)


# ---------------------------------------------------------- clip_scalars_
def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float64).to(torch.float32).item()


def test_clip_scalars_matches_the_fallback_bitwise():
    """The op and its plain-PyTorch twin on 400 argument sets, every output
    and every log bit for bit (dtypes included)."""
    for case in clip_scalars_cases():
        got = run_clip_scalars(ops.clip_scalars_, case)
        want = run_clip_scalars(_fallback.clip_scalars_, case)
        for name in want:
            assert_identical(got[name], want[name]), (name, case)


def test_clip_scalars_values():
    """The listed cases of clip_scalars_cases, against arithmetic on Python floats."""
    cases = clip_scalars_cases()
    # norm 3, max_norm 1: clipped; the coefficient is one true division.
    out = run_clip_scalars(ops.clip_scalars_, cases[0])
    coef = 1.0 / (3.0 + 1e-6)
    assert out["factor"].dtype == torch.float64 and out["factor"].item() == coef
    assert out["divisor"].dtype == torch.float32 and out["divisor"].item() == _f32(1.0 / coef)
    assert out["found"].dtype == torch.float32 and out["found"].item() == 0.0
    assert out["last_norm"].item() == 3.0 and out["last_coef"].item() == _f32(coef)
    assert out["skipped"].item() == 7  # counted, but nothing to count
    # norm 0.5: not clipped, divisor exactly 1.
    out = run_clip_scalars(ops.clip_scalars_, cases[1])
    assert out["factor"].item() == 1.0 and out["divisor"].item() == 1.0 and out["found"].item() == 0.0
    # norm 1e300 over max_norm 1e-3: the divisor 1e303 is beyond float32 (skip_inf_divisor).
    assert cases[2]["skip_inf_divisor"] and cases[2]["count_skip"]
    out = run_clip_scalars(ops.clip_scalars_, cases[2])
    assert out["divisor"].item() == math.inf and out["found"].item() == 1.0 and out["skipped"].item() == 8
    assert out["last_norm"].item() == math.inf  # 1e300 in float32
    case = dict(cases[2], skip_inf_divisor=False)
    assert run_clip_scalars(ops.clip_scalars_, case)["found"].item() == 0.0
    # NaN norm: found, NaN propagates to the coefficient.
    out = run_clip_scalars(ops.clip_scalars_, dict(cases[3], count_skip=True))
    assert out["found"].item() == 1.0 and math.isnan(out["factor"].item()) and math.isnan(out["last_coef"].item())
    assert out["skipped"].item() == 8
    assert run_clip_scalars(ops.clip_scalars_, dict(cases[3], count_skip=False))["skipped"].item() == 7
    # A loss scale and an extra divisor: the norm is unscaled, the divisor carries both.
    out = run_clip_scalars(ops.clip_scalars_, cases[4])
    norm = 3.0 / 65536.0
    coef = min(1.0, 1.0 / (norm + 1e-6))
    assert out["last_norm"].item() == _f32(norm) and out["factor"].item() == coef / 65536.0
    assert out["divisor"].item() == _f32(65536.0 * 4.0 / coef)
    assert out["found"].item() == 1.0  # from extra_found
    assert run_clip_scalars(ops.clip_scalars_, dict(cases[4], extra_found=None))["found"].item() == 0.0


def test_clip_scalars_bumps_the_versions_it_writes():
    case = clip_scalars_cases()[0]
    last_norm, last_coef, skipped = torch.zeros(()), torch.ones(()), torch.zeros((), dtype=torch.int64)
    versions = [t._version for t in (last_norm, last_coef, skipped)]
    ops.clip_scalars_(case["norm"], 1.0, None, None, None, None, True, last_norm, last_coef, skipped, False)
    assert [t._version for t in (last_norm, last_coef, skipped)] == [versions[0] + 1, versions[1] + 1, versions[2]]
    ops.clip_scalars_(case["norm"], 1.0, None, None, None, None, True, last_norm, last_coef, skipped, True)
    assert skipped._version == versions[2] + 1


_WRITING_CALLS = {
    "scale": lambda ts: ops.multi_tensor_scale_(ts, torch.tensor(0.5)),
    "clamp": lambda ts: ops.multi_tensor_clamp_(ts, 0.5),
    "clip": lambda ts: ops.clip_(ts, 0.5, 2.0),
}


@pytest.mark.parametrize("call", list(_WRITING_CALLS))
@pytest.mark.parametrize("where", ["fake", "meta"])
def test_traced_writes_bump_the_versions(call, where):
    """Fake and meta calls bump what they may write, as the device kernels
    do for a write (a coefficient of 1 is not known there): AOTAutograd
    reads the counters (found in review: they stayed 0)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        device = "meta" if where == "meta" else "cpu"
        ts = [torch.ones(5, device=device), torch.ones(2, 3, device=device)]
        _WRITING_CALLS[call](ts)
        return [t._version for t in ts]

    if where == "fake":
        with FakeTensorMode():
            assert run() == [1, 1]
    else:
        assert run() == [1, 1]


@pytest.mark.parametrize("count_skip", [False, True])
def test_traced_clip_scalars_bumps_the_versions_it_writes(count_skip):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logs = torch.zeros(()), torch.ones(()), torch.zeros((), dtype=torch.int64)
        ops.clip_scalars_(torch.tensor(3.0, dtype=torch.float64), 1.0, None, None, None, None, True, *logs, count_skip)
        assert [t._version for t in logs] == [1, 1, int(count_skip)]


@pytest.mark.parametrize("call", list(_WRITING_CALLS))
def test_compiled_write_of_a_tensor_saved_for_backward_raises_as_eager(call):
    """Found in review: compiled, the write of a tensor that the backward
    needs went unseen, and the backward used the written values; eager
    (and torch's mul_, compiled or not) raises."""
    def f(g, w):
        y = (g * w).sum()  # saves g
        _WRITING_CALLS[call]([g])
        return y

    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        g, w = torch.full((4,), 3.0), torch.ones(4, requires_grad=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            fn(g, w).backward()


def _scalars_call(**change):
    args = dict(norm=torch.tensor(3.0, dtype=torch.float64), max_norm=1.0, loss_scale=None, extra_scale=None,
                found_inf=None, extra_found=None, skip_inf_divisor=True, last_norm=torch.full((), math.nan),
                last_coef=torch.full((), math.nan), skipped=torch.tensor(7), count_skip=True)
    args.update(change)
    return args


def _freed(dtype=torch.float64):
    """A one-element view of a storage since resized to 0 bytes (as FSDP frees parameters)."""
    base = torch.zeros(4, dtype=dtype)
    view = base[1]
    base.untyped_storage().resize_(0)
    return view


def _shrunk():
    """The last element of a storage since shrunk to its first element."""
    base = torch.zeros(1 << 10)
    view = base[-1]
    base.untyped_storage().resize_(base.element_size())
    return view


SCALARS_ERRORS = [
    # Found in review: each read or wrote memory it does not own (a segfault).
    ("norm_freed", dict(norm=_freed()), "norm has its element beyond the memory of its storage"),
    ("loss_scale_freed", dict(loss_scale=_freed(torch.float32)), "loss_scale has its element beyond"),
    ("last_norm_shrunk", dict(last_norm=_shrunk()), "last_norm has its element beyond"),
    # Found in review: torch's Negative fallback wrote the others, then failed an internal assert.
    ("last_norm_negative_view", dict(last_norm=torch._neg_view(torch.zeros(()))), "last_norm is a negative-bit view"),
    ("skipped_negative_view", dict(skipped=torch._neg_view(torch.tensor(3))), "skipped is a negative-bit view"),
    # Found in review: torch's Negative fallback copied these before any
    # check (a segfault, or a norm from stale memory).
    ("norm_negative_view_freed", dict(norm=torch._neg_view(_freed())), "norm has its element beyond"),
    ("loss_scale_negative_view_shrunk", dict(loss_scale=torch._neg_view(_shrunk())), "loss_scale has its element beyond"),
    ("found_inf_negative_view_freed", dict(found_inf=torch._neg_view(_freed(torch.float32))), "found_inf has its element"),
    ("norm_2_elements", dict(norm=torch.ones(2, dtype=torch.float64)), "norm must be a tensor with one element"),
    ("norm_int", dict(norm=torch.tensor(3)), "norm has dtype Long"),
    ("max_norm_-1", dict(max_norm=-1.0), "max_norm"),
    ("max_norm_nan", dict(max_norm=math.nan), "max_norm"),
    ("loss_scale_2_elements", dict(loss_scale=torch.ones(2)), "loss_scale must be a tensor with one element"),
    ("loss_scale_meta", dict(loss_scale=torch.ones((), device="meta")), "loss_scale is on meta"),
    ("extra_scale_2_elements", dict(extra_scale=torch.ones(2)), "extra_scale must be a tensor with one element"),
    ("extra_found_int", dict(extra_found=torch.tensor(1)), "extra_found has dtype Long"),
    ("last_norm_meta", dict(last_norm=torch.zeros((), device="meta")), "last_norm is on meta"),
    ("found_inf_bool", dict(found_inf=torch.tensor(True)), "found_inf has dtype Bool"),
    ("last_norm_float64", dict(last_norm=torch.zeros((), dtype=torch.float64)), "last_norm must be a Float tensor"),
    ("last_coef_2_elements", dict(last_coef=torch.zeros(2)), "last_coef must be a tensor with one element"),
    ("skipped_float", dict(skipped=torch.zeros(())), "skipped must be a Long tensor"),
]


@pytest.mark.parametrize("mode", ["grad", "inference"])
@pytest.mark.parametrize("change, match", [e[1:] for e in SCALARS_ERRORS], ids=[e[0] for e in SCALARS_ERRORS])
def test_clip_scalars_errors_name_the_argument_and_modify_nothing(change, match, mode):
    # Inference mode too: no Autograd kernel runs there (found in review: a
    # negative-bit last_norm was refused only by it, after torch's Negative
    # fallback had written last_coef and skipped).
    args = _scalars_call(**change)
    # (A negative view is compared through its bits' negation: not by snapshot.)
    written = [t.resolve_neg() if t.is_neg() else t for t in (args["last_norm"], args["last_coef"], args["skipped"])
               if t.device.type != "meta"]
    before = snapshot(written)
    with torch.inference_mode(mode == "inference"), pytest.raises(RuntimeError, match=match):
        ops.clip_scalars_(**args)
    assert_untouched(written, before)


def _freed_many():
    """Two elements of a storage since resized to 0 bytes."""
    base = torch.ones(2)
    base.untyped_storage().resize_(0)
    return base


def _shrunk_list_entry(dtype=torch.float32):
    """A 512-element view whose storage keeps only its first 4 elements'
    bytes (elements beyond the storage, not the whole view freed)."""
    base = torch.ones(1 << 10, dtype=dtype)
    view = base[512:]
    base.untyped_storage().resize_(4 * base.element_size())
    return view


@pytest.mark.parametrize("mode", ["grad", "inference"])
@pytest.mark.parametrize("case", ["coef_shrunk", "coef_freed", "coef_negative_view_shrunk", "coef_negative_view_freed_2",
                                  "norm_negative_view",
                                  "norm_negative_view_per_tensor", "clip_negative_view", "scale_negative_view"])
def test_memory_beyond_storage_is_refused_before_anything_is_read(case, mode):
    """Found in review: multi_tensor_scale_ read coef without checking its
    storage (stale memory scaled the tensors, or a segfault), and a
    negative-bit view went through torch's Negative fallback, whose copy
    read beyond the storage before the kernels' check (a norm of stale
    memory, or a segfault)."""
    tensors = make_grads([(100,), (7, 3)], torch.float32, "cpu", seed=74)
    before = snapshot(tensors)
    calls = {
        "coef_shrunk": (lambda: ops.multi_tensor_scale_(tensors, _shrunk()),
                        "coef has its element beyond"),
        "coef_freed": (lambda: ops.multi_tensor_scale_(tensors, _freed(torch.float32)), "coef has its element beyond"),
        "coef_negative_view_shrunk": (lambda: ops.multi_tensor_scale_(tensors, torch._neg_view(_shrunk())),
                                      "coef has its element beyond"),
        # Found in a later review: a many-element one was resolved (read)
        # before its size was refused.
        "coef_negative_view_freed_2": (lambda: ops.multi_tensor_scale_(tensors, torch._neg_view(_freed_many())),
                                       "coef must be a dense tensor with one element"),
        "norm_negative_view": (lambda: ops.multi_tensor_norm([torch._neg_view(_shrunk_list_entry())], 2.0, False),
                               r"tensors\[0\] has elements beyond the memory of its storage"),
        "norm_negative_view_per_tensor": (
            lambda: ops.multi_tensor_norm(tensors + [torch._neg_view(_shrunk_list_entry(torch.bfloat16))], 1.0, True),
            r"tensors\[2\] has elements beyond the memory of its storage"),
        "clip_negative_view": (lambda: ops.clip_(tensors + [torch._neg_view(_shrunk_list_entry())], 0.1, 2.0),
                               r"tensors\[2\] has elements beyond the memory of its storage"),
        "scale_negative_view": (
            lambda: ops.multi_tensor_scale_(tensors + [torch._neg_view(_shrunk_list_entry())], torch.tensor(0.5)),
            r"tensors\[2\] has elements beyond the memory of its storage"),
    }
    call, match = calls[case]
    with torch.inference_mode(mode == "inference"), pytest.raises(RuntimeError, match=match):
        call()
    assert_untouched(tensors, before)


@pytest.mark.parametrize("op", ["norm", "scale_", "clamp_", "clip_", "scale_meta_coef"])
def test_meta_tensor_among_cpu_ones_is_refused(op):
    """A meta argument sends the call to the fake kernel, which refuses the
    mix as the kernels refuse another device (found in review: garbage
    norms came back, and nothing was written, without an error)."""
    cpu = make_grads([(100,), (7, 3)], torch.float32, "cpu", seed=73)
    before = snapshot(cpu)
    tensors = cpu + [torch.ones(2, device="meta")]
    calls = {
        "norm": lambda: ops.multi_tensor_norm(tensors, 2.0, True),
        "scale_": lambda: ops.multi_tensor_scale_(tensors, torch.tensor(0.5)),
        "clamp_": lambda: ops.multi_tensor_clamp_(tensors, 0.1),
        "clip_": lambda: ops.clip_(tensors, 0.1, 2.0),
        "scale_meta_coef": lambda: ops.multi_tensor_scale_(cpu, torch.tensor(0.5, device="meta")),
    }
    match = "coef is on meta" if op == "scale_meta_coef" else r"tensors\[2\] is on meta but tensors\[0\] is on cpu"
    with pytest.raises(RuntimeError, match=match):
        calls[op]()
    assert_untouched(cpu, before)
    meta = [torch.ones(3, device="meta"), torch.ones(2, device="meta")]
    ops.multi_tensor_scale_(meta, torch.tensor(0.5))  # a CPU coefficient with meta tensors, as on a GPU
    assert ops.clip_(meta, 0.1, 2.0).device.type == "meta"


def _bad_list_calls():
    good = [torch.ones(5), torch.ones(2, 3)]
    return [
        ("int-dtype", lambda: ops.multi_tensor_norm(good + [torch.ones(2, dtype=torch.int32)], 2.0, False),
         r"tensors\[2\] has dtype Int"),
        ("sparse", lambda: ops.multi_tensor_clamp_([torch.ones(3).to_sparse()] + good, 0.5), r"tensors\[0\] has layout"),
        ("ord", lambda: ops.multi_tensor_norm(good, -1.0, True), "ord must be a positive number or inf"),
        ("max_norm", lambda: ops.clip_(good, -1.0, 2.0), "max_norm must be a finite number >= 0"),
        ("clip_value", lambda: ops.multi_tensor_clamp_(good, -0.5), "clip_value must be a number >= 0"),
        ("coef", lambda: ops.multi_tensor_scale_(good, torch.ones(2)), "coef must be a tensor with one element"),
        ("coef-int", lambda: ops.multi_tensor_scale_(good, torch.tensor(1)), "coef must be a floating-point tensor"),
        ("scalars", lambda: ops.clip_scalars_(**_scalars_call(last_norm=torch.zeros((), dtype=torch.float64))),
         "last_norm must be a Float tensor"),
    ]


@pytest.mark.parametrize("k", range(len(_bad_list_calls())), ids=[c[0] for c in _bad_list_calls()])
def test_fake_kernels_refuse_what_the_kernels_refuse(k):
    """Traced (FakeTensorMode, as torch.compile and export trace), a call
    is refused with the eager call's message (found in review: integer and
    sparse tensors, a negative max_norm and the like passed tracing and
    failed only when the graph ran)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    name, call, match = _bad_list_calls()[k]
    # Eager, a sparse tensor stops at the dispatcher (no SparseCPU kernel).
    eager = (NotImplementedError, "SparseCPU") if name == "sparse" else (RuntimeError, match)
    with pytest.raises(eager[0], match=eager[1]):
        call()
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match=match):
        call()


def test_fake_kernels_take_empty_lists_as_the_kernels_do():
    # Only multi_tensor_scale_ reaches a kernel with an empty list (its coef
    # gives the dispatcher a device; found in review: the fake kernel
    # refused it); the others have no tensor to dispatch on. The Python
    # functions handle empty lists before calling an op.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(NotImplementedError, match="no tensor arguments"):
        ops.multi_tensor_norm([], 2.0, False)
    ops.multi_tensor_scale_([], torch.tensor(0.5))
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="multi_tensor_norm: tensors is empty"):
            ops.multi_tensor_norm([], 2.0, False)
        ops.multi_tensor_scale_([], torch.tensor(0.5))
        with pytest.raises(RuntimeError, match="coef must be a tensor with one element"):
            ops.multi_tensor_scale_([], torch.ones(2))

def test_clip_scalars_refuses_inference_logs_and_logs_that_require_grad():
    with torch.inference_mode():
        inference_log = torch.zeros(())
    with pytest.raises(RuntimeError, match="last_coef is an inference tensor"):
        ops.clip_scalars_(**_scalars_call(last_coef=inference_log))
    with torch.inference_mode():
        inference_count = torch.zeros((), dtype=torch.int64)
    with pytest.raises(RuntimeError, match="skipped is an inference tensor"):
        ops.clip_scalars_(**_scalars_call(skipped=inference_count))
    log = torch.zeros((), requires_grad=True)
    with pytest.raises(RuntimeError, match="last_norm requires grad"):
        ops.clip_scalars_(**_scalars_call(last_norm=log))
    with pytest.raises(RuntimeError, match="last_coef requires grad"):
        ops.clip_scalars_(**_scalars_call(last_coef=torch.ones((), requires_grad=True)))
    with torch.no_grad():
        ops.clip_scalars_(**_scalars_call(last_norm=log))
    assert log.item() == 3.0


def test_outputs_from_inputs_that_require_grad_refuse_backward():
    # Not differentiable, and not silently constant: a backward through the
    # norm or the clip coefficient raises, as through a torch custom op
    # without a derivative (found in review: the weights' gradient came out
    # as if the norm were a constant).
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    total, each = ops.multi_tensor_norm([w, w.detach()], 2.0, True)
    assert total.requires_grad and each.requires_grad and total.item() == pytest.approx(50**0.5)
    with pytest.raises(RuntimeError, match="derivative for fastclip::multi_tensor_norm is not implemented"):
        ((w * 2).sum() + total).backward()
    assert w.grad is None
    norm = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    factor, divisor, found = ops.clip_scalars_(**_scalars_call(norm=norm))
    assert not found.requires_grad
    with pytest.raises(RuntimeError, match="derivative for fastclip::clip_scalars_ is not implemented"):
        factor.backward()
    # Without grad mode or a requiring input, outputs are plain tensors.
    with torch.no_grad():
        assert not ops.multi_tensor_norm([w], 2.0, True)[0].requires_grad
    assert not ops.multi_tensor_norm([w.detach()], 2.0, True)[0].requires_grad
    assert not fastclip.get_total_norm([w]).requires_grad  # under no_grad, as torch's


def test_scale_refuses_a_coefficient_that_requires_grad():
    """torch's mul_ records the coefficient's history; the op would drop it
    silently (found in review): refused under grad mode, nothing written."""
    t = torch.tensor([3.0, 4.0])
    coef = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(RuntimeError, match="coef requires grad"):
        ops.multi_tensor_scale_([t], coef)
    assert t.tolist() == [3.0, 4.0] and t._version == 0
    with torch.no_grad():
        ops.multi_tensor_scale_([t], coef)
    assert t.tolist() == [1.5, 2.0] and not t.requires_grad


@pytest.mark.parametrize("impl", ["op", "fallback"])
def test_clip_scalars_logs_have_no_history(impl):
    """The logs are written without history by the op and the fallback alike
    (found in review: the fallback's copy_ gave them a grad_fn)."""
    call = _scalars_call(norm=torch.tensor(3.0, dtype=torch.float64, requires_grad=True))
    if impl == "op":
        ops.clip_scalars_(**call)
    else:
        fastclip._fallback.clip_scalars_(*call.values())
    assert call["last_norm"].item() == 3.0
    assert not call["last_norm"].requires_grad and not call["last_coef"].requires_grad


@pytest.mark.parametrize("k", [0, 4, 7, 11])
def test_clip_scalars_opcheck(k):
    case = clip_scalars_cases()[k]
    args = (case["norm"], case["max_norm"], case["loss_scale"], case["extra_scale"], case["found_inf"],
            case["extra_found"], case["skip_inf_divisor"], torch.zeros(()), torch.ones(()),
            torch.zeros((), dtype=torch.int64), case["count_skip"])
    torch.library.opcheck(ops.clip_scalars_.default, args)


def test_python_coefficient_is_one_true_division_as_in_the_kernels():
    """The split path's coefficient (clip.py) has the kernels' bits: one
    float64 division (torch's max_norm / tensor rounds twice and was one
    ulp off in about a quarter of these)."""
    from fastclip.clip import _coefficient

    rng = random.Random(5)
    for _ in range(2000):
        norm, max_norm = rng.random() * 10 ** rng.randint(-8, 8), rng.random() * 10 ** rng.randint(-8, 8)
        got = _coefficient(max_norm, torch.tensor(norm, dtype=torch.float64)).item()
        assert got == min(1.0, max_norm / (norm + 1e-6)), (norm, max_norm)


@pytest.mark.parametrize("ord", [1.0, 2.0, 3.5], ids=ord_id)
@pytest.mark.parametrize("value", [1.2345678901234567, 1e200, 1e-200])
def test_reference_norm_is_far_more_accurate_than_the_fp64_tolerance(value, ord):
    # Found in review: vector_norm's sequential CPU sum was 7.6e-13 off on
    # these values, and the CUDA clip test of them held fp64 to 2^-43.
    n = 65_563
    exact = math.fsum([(value / 2.0**math.frexp(value)[1]) ** ord] * n) ** (1.0 / ord) * 2.0**math.frexp(value)[1]
    got = ref_norm([torch.full((n,), value, dtype=torch.float64)], ord).item()
    assert abs(got - exact) <= FP64_SCALE_RTOL / 16 * exact, (got, exact)
