"""torch.vmap over the ops and the Python functions (per-sample norms and
clipping, as in DP-SGD): the batching rules in fastclip/_ops.py and, for
the common case of multi_tensor_norm and clip_, csrc/batching.cpp.

Each sample must get what the same call on that sample alone gives: the
same per-tensor norms, its total within float rounding of the combination
(see assert_total_close), its values clipped by that coefficient, in eager
vmap and in torch.compile of a vmap; what cannot be done per sample in
place is refused before anything is written.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings

import pytest
import torch

import fastclip  # registers the ops
from testing import (
    DEVICE_PARAMS,
    DTYPES,
    ORDS,
    assert_norm_close,
    assert_same_bits,
    assert_untouched,
    dtype_id,
    make_grads,
    make_params,
    ord_id,
    ref_norm,
    ref_norms_each,
    require_kernel,
    snapshot,
)

ops = torch.ops.fastclip
BATCH = 5


def _batched(dtype, device, seed=0, scale=3.0):
    """Three tensors batched along different dimensions (0, 1 and the last,
    so two of the per-sample slices are strided), the batch first in
    ``rows``, and one tensor shared by every sample."""
    x, y, z, shared = make_grads([(BATCH, 3, 17), (7, BATCH), (2, 9, BATCH), (11,)], dtype, device, seed, scale)
    return [x, y, z], [0, 1, -1], shared


def assert_total_close(got, alone):
    """A sample's total norm against the op's call on that sample alone:
    the rules combine the sample's float64 per-tensor norms, the op its
    exact sums, so a float64 total may differ in its last bits and a
    float32 one (rounded from it) by one ulp, rarely."""
    rtol = 1e-14 if got.dtype == torch.float64 else 2.0**-23
    torch.testing.assert_close(got, alone, rtol=rtol, atol=0.0, equal_nan=True)


def assert_values_close(got, alone):
    """Clipped values against the op's call on the sample alone: their
    coefficient comes from that total, so one ulp apart at most (float64
    data takes it unrounded); any NaN for a NaN (a NaN coefficient's
    payload is kept differently by torch's multiply and the kernels)."""
    if got.dtype == torch.float64:
        rtol = 1e-15
    else:
        rtol = torch.finfo(got.dtype).eps
    torch.testing.assert_close(got, alone, rtol=rtol, atol=0.0, equal_nan=True)


def _sample(tensors, dims, b):
    return [t.select(d, b) for t, d in zip(tensors, dims)]


@contextlib.contextmanager
def _no_fallback():
    """Errors on fastclip's fallback warning: batched tensors must reach the ops."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastclip: computing with plain PyTorch", category=UserWarning)
        yield


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fastclip.clip, "_warned", set())


# ------------------------------------------------------------------ the ops
@pytest.mark.parametrize("per_tensor,fp64", [(False, False), (True, False), (True, True)], ids=["total", "each", "fp64"])
@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_norm_per_sample_is_the_call_on_the_sample(device, dtype, ord, per_tensor, fp64):
    require_kernel(device)
    tensors, dims, shared = _batched(dtype, device)
    total, each = torch.vmap(lambda x, y, z: ops.multi_tensor_norm([x, y, shared, z], ord, per_tensor, fp64),
                             in_dims=tuple(dims))(*tensors)
    out_dtype = torch.float64 if fp64 else torch.float32
    assert total.shape == (BATCH,) and total.dtype == out_dtype
    assert each.shape == (BATCH, 4 if per_tensor else 0) and each.dtype == out_dtype
    for b in range(BATCH):
        x, y, z = _sample(tensors, dims, b)
        alone_total, alone_each = ops.multi_tensor_norm([x, y, shared, z], ord, per_tensor, fp64)
        assert_same_bits(each[b], alone_each)
        assert_total_close(total[b], alone_total)
        assert_norm_close(total[b].float(), ref_norm([x, y, shared, z], ord), dtype)
        if per_tensor:
            assert_norm_close(each[b].float(), ref_norms_each([x, y, shared, z], ord), dtype)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_norm_in_nested_vmap(device):
    require_kernel(device)
    x = make_grads([(3, 4, 6)], torch.bfloat16, device, seed=1)[0]
    got = torch.vmap(torch.vmap(lambda a: ops.multi_tensor_norm([a, a[:2]], 3.5, False)[0]))(x)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert_same_bits(got[i, j], ops.multi_tensor_norm([x[i, j], x[i, j, :2]], 3.5, False)[0])


@pytest.mark.parametrize("fp64", [False, True], ids=["fp32_out", "fp64_out"])
@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_norm_in_nested_vmap_of_tensors_batched_at_one_level_or_both(device, ord, fp64):
    """Under nested vmap the outer rule gets the inner rule's call, which
    takes each inner sample as a slice: tensors batched at both levels
    (along different dimensions), at the outer or the inner level only, or
    at neither. Every (outer, inner) sample gets the op's call on it."""
    require_kernel(device)
    outer, inner = 3, 4
    both, outer_only, inner_only, neither = make_grads(
        [(6, outer, inner), (outer, 5), (2, inner, 3), (7,)],
        [torch.float32, torch.bfloat16, torch.float64, torch.float16], device, seed=23, scale=3.0)

    def norms(a, o):
        return torch.vmap(lambda x, y: ops.multi_tensor_norm([x, o, y, neither], ord, True, fp64),
                          in_dims=(1, 1))(a, inner_only)

    total, each = torch.vmap(norms, in_dims=(1, 0))(both, outer_only)
    assert total.shape == (outer, inner) and each.shape == (outer, inner, 4)
    for i in range(outer):
        for j in range(inner):
            sample = [both[:, i, j], outer_only[i], inner_only[:, j], neither]
            alone_total, alone_each = ops.multi_tensor_norm(sample, ord, True, fp64)
            assert_same_bits(each[i, j], alone_each)
            assert_total_close(total[i, j], alone_total)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_norm_with_slices_per_sample_is_the_call_on_the_sample(device):
    """The op's own slices argument under vmap: each sample's slices."""
    require_kernel(device)
    x, shared = make_grads([(4, BATCH, 7), (4, 3)], torch.float32, device, seed=24)
    total, each = torch.vmap(lambda a: ops.multi_tensor_norm([a, shared], 2.0, True, slices=4), in_dims=1)(x)
    assert each.shape == (BATCH, 8)
    for b in range(BATCH):
        alone_total, alone_each = ops.multi_tensor_norm([x[:, b], shared], 2.0, True, slices=4)
        assert_same_bits(each[b], alone_each)
        assert_total_close(total[b], alone_total)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] has shape \[4, 7\], but slices=3"):
        torch.vmap(lambda a: ops.multi_tensor_norm([a], 2.0, True, slices=3), in_dims=1)(x)
    with pytest.raises(RuntimeError, match="slices must be at least 1, got 0"):
        torch.vmap(lambda a: ops.multi_tensor_norm([a], 2.0, True, slices=0))(x)


@pytest.mark.parametrize("nested", [False, True], ids=["vmap", "nested_vmap"])
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_norm_bits_of_samples_laid_out_in_their_own_order(device, nested):
    """Samples that are dense but column-major, more than a chunk each: with
    gaps between them (one vmap), or batched at two levels whose dimensions
    do not merge into one (nested). Each is read as the op reads it alone,
    in memory order (found in review: row-major copies changed the bits)."""
    require_kernel(device)
    op = lambda t: ops.multi_tensor_norm([t], 2.0, True, True)  # noqa: E731
    if nested:
        x = make_grads([(4, 3, 1031, 64)], torch.float32, device, seed=25)[0].permute(1, 0, 3, 2)
        _, each = torch.vmap(torch.vmap(op))(x)
        samples = {(i, j): x[i, j] for i in range(3) for j in range(4)}
    else:
        x = make_grads([(4, 2, 1031, 64)], torch.float32, device, seed=26)[0][:, 0].transpose(1, 2)
        _, each = torch.vmap(op)(x)
        samples = {(j,): x[j] for j in range(4)}
    for index, sample in samples.items():
        assert_same_bits(each[index], op(sample)[1])


@pytest.mark.parametrize("magnitude", [1e-150, 1e-80, 1e80])
@pytest.mark.parametrize("ord", [3.5, 1.5, 0.5], ids=ord_id)
def test_float64_totals_of_general_orders_as_precise_as_the_op(ord, magnitude):
    """fp64 totals and clipped fp64 values of general orders at large and
    small magnitudes, against the op on the sample alone (found in review:
    combined by the kernels' approximate |x|^p they were 3.7e-14 off)."""
    require_kernel("cpu")
    tensors, dims, _ = _batched(torch.float64, "cpu", seed=27)
    tensors = [t * magnitude for t in tensors]  # in float64 (make_grads scales in float32)
    total, _ = torch.vmap(lambda x, y, z: ops.multi_tensor_norm([x, y, z], ord, False, True),
                          in_dims=tuple(dims))(*tensors)
    clipped = [t.clone() for t in tensors]
    torch.vmap(lambda x, y, z: ops.clip_([x, y, z], magnitude, ord), in_dims=tuple(dims))(*clipped)
    for b in range(BATCH):
        alone = [t.clone() for t in _sample(tensors, dims, b)]
        assert_total_close(total[b], ops.multi_tensor_norm(alone, ord, False, True)[0])
        ops.clip_(alone, magnitude, ord)
        for got, want in zip(_sample(clipped, dims, b), alone):
            assert_values_close(got, want)


def test_float64_totals_at_the_edge_of_the_double_range_as_the_op_decides():
    """Samples whose norm lies within a few ulps of 1.8e308: the total, the
    clip and error_if_nonfinite under vmap as the op on each alone (found in
    review: a combination of rounded norms fell on the other side of the
    edge, raised an internal AssertionError or scaled what the op refuses)."""
    require_kernel("cpu")
    a, b = make_grads([(5,), (7,)], torch.float64, seed=28)
    norm = ops.multi_tensor_norm([a, b], 2.0, False, True)[0].item()
    steps = torch.arange(-40, 41, dtype=torch.float64)
    scales = (sys.float_info.max / norm) * (1 + steps * 2.0**-52)
    xs, ys = a * scales[:, None], b * scales[:, None]
    total, _ = torch.vmap(lambda x, y: ops.multi_tensor_norm([x, y], 2.0, False, True))(xs, ys)
    finite_alone = []
    for k in range(len(steps)):
        alone = ops.multi_tensor_norm([xs[k], ys[k]], 2.0, False, True)[0]
        assert_same_bits(total[k], alone)
        finite_alone.append(math.isfinite(alone.item()))
    assert any(finite_alone) and not all(finite_alone)  # the samples straddle the edge
    clipped = [xs.clone(), ys.clone()]
    torch.vmap(lambda x, y: ops.clip_([x, y], 1.0, 2.0))(*clipped)
    for k in range(len(steps)):
        alone = [xs[k].clone(), ys[k].clone()]
        ops.clip_(alone, 1.0, 2.0)
        assert_same_bits(clipped[0][k], alone[0])
        assert_same_bits(clipped[1][k], alone[1])
    first_bad = finite_alone.index(False)
    for rows in (slice(0, first_bad), slice(0, first_bad + 1)):
        x, y = xs[rows].clone(), ys[rows].clone()
        call = lambda: torch.vmap(lambda p, q: ops.clip_([p, q], 1.0, 2.0, True))(x, y)  # noqa: E731
        if rows.stop == first_bad:
            call()
        else:
            with pytest.raises(RuntimeError, match="non-finite"):
                call()
            assert torch.equal(x, xs[rows]) and torch.equal(y, ys[rows])


def test_norm_of_an_empty_batch():
    require_kernel("cpu")
    total, each = torch.vmap(lambda a: ops.multi_tensor_norm([a], 2.0, True))(torch.ones(0, 3))
    assert total.shape == (0,) and each.shape == (0, 1) and total.dtype == torch.float32
    with pytest.raises(RuntimeError, match="ord must be a positive number"):
        torch.vmap(lambda a: ops.multi_tensor_norm([a], -1.0, True))(torch.ones(0, 3))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_scale_by_a_coefficient_per_sample(device, dtype):
    """Sample 1's coefficient is exactly 1: its slices keep their bits."""
    require_kernel(device)
    tensors, dims, _ = _batched(dtype, device, seed=2)
    coef = torch.tensor([0.5, 1.0, 0.3, 2.0, 1e-3], device=device)
    expected = [t.clone() for t in tensors]
    for b in range(BATCH):
        ops.multi_tensor_scale_(_sample(expected, dims, b), coef[b])
    before = [t.clone() for t in tensors]

    def f(x, y, z, c):
        ops.multi_tensor_scale_([x, y, z], c)
        return x

    torch.vmap(f, in_dims=(*dims, 0))(*tensors, coef)
    for t, e, old, d in zip(tensors, expected, before, dims):
        assert_same_bits(t, e)
        assert_same_bits(t.select(d, 1), old.select(d, 1))


@pytest.mark.parametrize("where", ["first", "second"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_scale_by_a_coefficient_inside_a_scaled_tensor(device, dtype, where):
    """coef per sample is an element of a tensor the call scales: read once,
    before anything is written, as the op on each sample reads it (found in
    review: the rule multiplied by a view of the data it was writing, so
    the later tensors were scaled by the scaled coefficient)."""
    require_kernel(device)
    gen = torch.Generator().manual_seed(5)
    a0 = (torch.rand(BATCH, 7, generator=gen) * 4 + 0.25).to(dtype).to(device)
    b0 = (torch.rand(BATCH, 3, generator=gen) * 4 + 0.25).to(dtype).to(device)
    order = (lambda a, b: [a, b]) if where == "first" else (lambda a, b: [b, a])
    expected_a, expected_b = a0.clone(), b0.clone()
    for i in range(BATCH):
        ops.multi_tensor_scale_(order(expected_a[i], expected_b[i]), expected_a[i][0])
    a, b = a0.clone(), b0.clone()

    def f(x, y):
        ops.multi_tensor_scale_(order(x, y), x[0])
        return x

    torch.vmap(f)(a, b)
    assert_same_bits(a, expected_a)
    assert_same_bits(b, expected_b)
    assert not torch.equal(b, b0)


@pytest.mark.parametrize("fn", ["clip_grad_value_", "clip_grads_with_norm_", "clip_grad_norm_"])
def test_functionalize_over_vmap_matches_vmap(fn):
    """functionalize(vmap(f)): the rules write functionalize's values with
    torch's ops, as fastclip's functions do under functionalize alone (found
    in review: the clamp and the one-coefficient scale called the in-place
    custom op, which functionalization refuses)."""
    gen = torch.Generator().manual_seed(6)
    grads = torch.randn(BATCH, 4, 3, generator=gen) * 3

    def one(g):
        p = torch.nn.Parameter(torch.zeros(4, 3))
        p.grad = g
        if fn == "clip_grad_value_":
            fastclip.clip_grad_value_([p], 0.5)
        elif fn == "clip_grads_with_norm_":
            fastclip.clip_grads_with_norm_([p], 1.0, 10.0)  # one coefficient for every sample
        else:
            fastclip.clip_grad_norm_([p], 1.0)
        return p.grad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's once-only notice
        got = torch.func.functionalize(torch.vmap(one))(grads.clone())
    expected = torch.vmap(one)(grads.clone())
    assert_same_bits(got, expected)
    assert not torch.equal(got, grads)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_scale_by_one_coefficient_and_clamp_are_one_call_on_the_values(device):
    """An unbatched coefficient or bound: every sample and the shared
    tensor written as the same op call on the whole tensors writes them."""
    require_kernel(device)
    tensors, dims, shared = _batched(torch.float32, device, seed=3)
    coef = torch.tensor(0.25, device=device)
    for name, call in {"scale": lambda ts: ops.multi_tensor_scale_(ts, coef),
                       "clamp": lambda ts: ops.multi_tensor_clamp_(ts, 0.7)}.items():
        ours, alone = [t.clone() for t in [*tensors, shared]], [t.clone() for t in [*tensors, shared]]

        def f(x, y, z, s):
            call([x, y, z, s])
            return x

        torch.vmap(f, in_dims=(*dims, None))(*ours)
        call(alone)
        for a, b in zip(ours, alone):
            assert_same_bits(a, b)
        assert not torch.equal(ours[0], tensors[0]), name


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_clip_per_sample_is_the_call_on_the_sample(device, dtype, ord):
    """Samples of different norms (one under max_norm, left as it was), a
    NaN in one sample that only that sample's norm and values see."""
    require_kernel(device)
    tensors, dims, _ = _batched(dtype, device, seed=4)
    for t, d in zip(tensors, dims):
        t.select(d, 1).mul_(1e-3)
    tensors[1][2, 3] = math.nan
    max_norm = 2.0
    expected = [t.clone() for t in tensors]
    norms = [ops.clip_(_sample(expected, dims, b), max_norm, ord) for b in range(BATCH)]
    total = torch.vmap(lambda x, y, z: ops.clip_([x, y, z], max_norm, ord), in_dims=tuple(dims))(*tensors)
    assert_total_close(total, torch.stack(norms))
    for t, e in zip(tensors, expected):
        assert_values_close(t, e)
    assert total[3].isnan() and total[1] < max_norm and (total[[0, 2, 4]] > max_norm).all()


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_clip_error_if_nonfinite_raises_before_any_sample_is_written(device):
    """The NaN is in the last sample: the samples before it would be
    clipped first if each sample were checked only as it is clipped."""
    require_kernel(device)
    tensors, dims, _ = _batched(torch.float32, device, seed=5)
    tensors[2][1, 4, BATCH - 1] = math.inf
    before = snapshot(tensors)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.vmap(lambda x, y, z: ops.clip_([x, y, z], 0.1, 2.0, True), in_dims=tuple(dims))(*tensors)
    assert_untouched(tensors, before)
    # And without the NaN, the flag changes nothing.
    tensors[2][1, 4, BATCH - 1] = 0.0
    expected = [t.clone() for t in tensors]
    for b in range(BATCH):
        ops.clip_(_sample(expected, dims, b), 0.1, 2.0)
    torch.vmap(lambda x, y, z: ops.clip_([x, y, z], 0.1, 2.0, True), in_dims=tuple(dims))(*tensors)
    for t, e in zip(tensors, expected):
        assert_values_close(t, e)


@pytest.mark.parametrize("op", ["clip_", "multi_tensor_scale_"])
def test_a_tensor_without_the_batch_is_not_written_per_sample(op):
    """torch's in-place ops refuse to write a per-sample value into a
    tensor that is not batched; so do the rules, before any write."""
    require_kernel("cpu")
    tensors, dims, shared = _batched(torch.float32, "cpu", seed=6)
    before = snapshot([*tensors, shared])
    calls = {"clip_": lambda ts, c: ops.clip_(ts, 0.1, 2.0),
             "multi_tensor_scale_": lambda ts, c: ops.multi_tensor_scale_(ts, c)}
    with pytest.raises(RuntimeError, match=r"tensors\[3\] is not batched"):
        torch.vmap(lambda x, y, z, c: calls[op]([x, y, z, shared], c),
                   in_dims=(*dims, 0))(*tensors, torch.full((BATCH,), 0.5))
    assert_untouched([*tensors, shared], before)


@pytest.mark.parametrize("op", ["clip_", "multi_tensor_scale_"])
def test_samples_that_share_memory_are_refused(op):
    """An expand()ed batch: every sample's slice is the same memory, each
    slice alone writable; written per sample, the last sample would win."""
    require_kernel("cpu")
    base = make_grads([(1, 40)], torch.float32, seed=7, scale=3.0)[0]
    expanded = base.expand(BATCH, 40)
    other = make_grads([(BATCH, 3)], torch.float32, seed=8)[0]
    before = snapshot([base, other])
    calls = {"clip_": lambda ts, c: ops.clip_(ts, 0.1, 2.0),
             "multi_tensor_scale_": lambda ts, c: ops.multi_tensor_scale_(ts, c)}
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has elements that share memory"):
        torch.vmap(lambda o, e, c: calls[op]([o, e], c))(other, expanded, torch.full((BATCH,), 0.5))
    assert_untouched([base, other], before)


def test_arguments_are_checked_under_vmap():
    require_kernel("cpu")
    tensors, dims, _ = _batched(torch.float32, "cpu", seed=9)
    before = snapshot(tensors)
    with pytest.raises(RuntimeError, match="max_norm must be a finite number"):
        torch.vmap(lambda x, y, z: ops.clip_([x, y, z], -1.0, 2.0), in_dims=tuple(dims))(*tensors)
    with pytest.raises(RuntimeError, match="clip_value"):
        torch.vmap(lambda x, y, z: ops.multi_tensor_clamp_([x, y, z], math.nan), in_dims=tuple(dims))(*tensors)
    assert_untouched(tensors, before)


# ------------------------------------------------------- the Python functions
def _none(result):
    assert result is None
    return torch.zeros(())  # vmap takes tensors only


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_", "get_total_norm",
                                "grad_norms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_functions_per_sample_are_the_calls_on_the_samples(fn, dtype):
    """The public functions inside vmap reach the ops (no fallback warning)
    and give each sample what the function called on it alone gives."""
    require_kernel("cpu")
    x, y = make_grads([(BATCH, 6, 5), (BATCH, 13)], dtype, seed=10, scale=2.0)
    calls = {
        "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 1.0, 3.5),
        "clip_grads_with_norm_": lambda ps: _none(fastclip.clip_grads_with_norm_(ps, 1.0, torch.tensor(4.0))),
        "clip_grad_value_": lambda ps: _none(fastclip.clip_grad_value_(ps, 0.5)),
        "get_total_norm": lambda ps: fastclip.get_total_norm([p.grad for p in ps], math.inf),
        "grad_norms": lambda ps: fastclip.grad_norms(ps, 1.0),
    }

    def f(a, b):
        ps = make_params([a, b])
        return calls[fn](ps), ps[0].grad, ps[1].grad

    with _no_fallback():
        got = torch.vmap(f)(x, y)
    for b in range(BATCH):
        alone = f(x[b], y[b])
        for g, a in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(alone)):
            assert_values_close(g[b], a)


def test_per_sample_gradients_clipped_like_dp_sgd():
    """torch.func.grad per sample, each sample's gradients clipped to
    max_norm: the reference is torch's clip_grad_norm_(foreach=False)."""
    require_kernel("cpu")
    w1, w2 = make_grads([(4, 8), (8,)], torch.float32, seed=11)
    data = make_grads([(BATCH, 4)], torch.float32, seed=12, scale=5.0)[0]

    def loss(w1, w2, x):
        return torch.tanh(x @ w1).dot(w2) ** 2

    grads = torch.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(w1, w2, data)

    def clipped(module, **kwargs):
        def f(g1, g2):
            ps = make_params([g1, g2])
            module.clip_grad_norm_(ps, 0.5, **kwargs)
            return ps[0].grad, ps[1].grad
        return torch.vmap(f)(*grads)

    with _no_fallback():
        ours = clipped(fastclip)
    theirs = clipped(torch.nn.utils, foreach=False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)
    assert torch.cat([g.flatten(1) for g in ours], 1).norm(dim=1).max() <= 0.5 * (1 + 1e-6)


# ------------------------------------------------------------ torch.compile
def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_compiled_vmap_of_the_norm_matches_eager(dtype):
    """Found in review: torch.compile of a vmap reached the ops, which had
    no batching rule."""
    require_kernel("cpu")
    x, y = make_grads([(BATCH, 6, 5), (13, BATCH)], dtype, seed=13)
    shared = make_grads([(9,)], dtype, seed=14)[0]

    def f(a, b):
        return fastclip.get_total_norm([a, b, shared], 3.5)

    eager = torch.vmap(f, in_dims=(0, 1))(x, y)
    assert_same_bits(_compiled(torch.vmap(f, in_dims=(0, 1)))(x, y), eager)
    total, each = _compiled(torch.vmap(lambda a, b: ops.multi_tensor_norm([a, b], 1.0, True, True),
                                       in_dims=(0, 1)))(x, y)
    alone = [ops.multi_tensor_norm([x[b], y[:, b]], 1.0, True, True) for b in range(BATCH)]
    assert_same_bits(total, torch.stack([a[0] for a in alone]))
    assert_same_bits(each, torch.stack([a[1] for a in alone]))


@pytest.mark.parametrize("fn", ["get_total_norm", "clip_grad_norm_"])
def test_compiled_vmap_keeps_one_graph_over_batch_sizes(fn):
    """Found in review: the op's `slices` argument, the batch size inside
    the rule, was a plain int, and every batch size compiled a graph (past
    dynamo's limit of 8 the rest ran uncompiled; Poisson-sampled batches
    of DP-SGD meet that); mark_dynamic raised. Each size's results are
    eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    require_kernel("cpu")

    def per_sample(a, b):
        if fn == "get_total_norm":
            return fastclip.get_total_norm([a, b])
        pa, pb = torch.zeros_like(a), torch.zeros_like(b)
        pa.grad, pb.grad = a, b
        total = fastclip.clip_grad_norm_([pa, pb], 1.0)
        return total, pa.grad, pb.grad

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(torch.vmap(per_sample, in_dims=(0, 1)), backend=counter)
    frames = []
    for batch in [7, 5, 9, 6, 11, 4, 10, 8, 12, 3]:
        x, y = make_grads([(batch, 6, 5), (13, batch)], torch.float32, seed=batch)
        expected = torch.vmap(per_sample, in_dims=(0, 1))(x.clone(), y.clone())
        got = compiled(x.clone(), y.clone())
        for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
            assert_same_bits(g, e)
        frames.append(counter.frame_count)
    assert frames[-1] <= 2 and frames[1:] == [frames[1]] * (len(frames) - 1), frames
    torch._dynamo.reset()
    x, y = make_grads([(6, 6, 5), (13, 6)], torch.float32, seed=3)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(y, 1)
    torch.compile(torch.vmap(per_sample, in_dims=(0, 1)), backend="aot_eager")(x, y)


def test_compiled_nested_vmap_keeps_one_graph_over_inner_batch_sizes():
    """The C++ rule read `slices` with toInt(), which made a symbolic inner
    batch size a constant (found in review)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    require_kernel("cpu")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    inner = torch.vmap(lambda a: fastclip.get_total_norm([a, 2.0 * a]))
    compiled = torch.compile(torch.vmap(inner), backend=counter)
    frames = []
    for batch in [5, 7, 4, 9, 6, 8]:
        x = make_grads([(3, batch, 4)], torch.float32, seed=batch)[0]
        assert_same_bits(compiled(x), torch.vmap(inner)(x))
        frames.append(counter.frame_count)
    assert frames[-1] <= 2 and frames[1:] == [frames[1]] * (len(frames) - 1), frames


@pytest.mark.parametrize("op", ["clip_", "multi_tensor_scale_", "multi_tensor_clamp_"])
def test_compiled_vmap_of_the_in_place_ops_matches_eager(op):
    require_kernel("cpu")
    x, y = make_grads([(BATCH, 6, 5), (13, BATCH)], torch.float32, seed=15, scale=2.0)
    coef = torch.tensor([0.5, 1.0, 0.25, 3.0, 0.1])

    def f(a, b, c):
        if op == "clip_":
            return ops.clip_([a, b], 1.0, 2.0)
        if op == "multi_tensor_scale_":
            ops.multi_tensor_scale_([a, b], c)
        else:
            ops.multi_tensor_clamp_([a, b], 0.3)
        return c

    eager_x, eager_y = x.clone(), y.clone()
    expected = torch.vmap(f, in_dims=(0, 1, 0))(eager_x, eager_y, coef)
    got = _compiled(torch.vmap(f, in_dims=(0, 1, 0)))(x, y, coef)
    assert_same_bits(got, expected)
    assert_same_bits(x, eager_x)
    assert_same_bits(y, eager_y)
    assert not torch.equal(x, make_grads([(BATCH, 6, 5)], torch.float32, seed=15, scale=2.0)[0])


def test_compiled_vmap_clip_error_if_nonfinite_writes_nothing():
    require_kernel("cpu")
    x, y = make_grads([(BATCH, 6, 5), (13, BATCH)], torch.float32, seed=16, scale=2.0)
    y[4, BATCH - 1] = math.nan
    before = snapshot([x, y])
    compiled = _compiled(torch.vmap(lambda a, b: ops.clip_([a, b], 0.1, 2.0, True), in_dims=(0, 1)))
    with pytest.raises(RuntimeError, match="non-finite"):
        compiled(x, y)
    assert_same_bits(x, before[0][0])
    assert_same_bits(y, before[1][0])


@pytest.mark.parametrize("op", ["clip_", "multi_tensor_scale_"])
def test_tensors_that_require_grad_are_refused_as_outside_vmap(op):
    """The rules run before the op's autograd kernel under vmap: without
    their own check a non-leaf that requires grad was multiplied with a
    history recorded (found in review of these rules)."""
    require_kernel("cpu")
    leaf = make_grads([(BATCH, 6)], torch.float32, seed=17, scale=3.0)[0].requires_grad_()
    x = leaf * 1.0  # not a leaf: torch's mul_ would take it
    before = snapshot([x.detach()])
    calls = {"clip_": lambda t, c: ops.clip_([t], 0.1, 2.0),
             "multi_tensor_scale_": lambda t, c: (ops.multi_tensor_scale_([t], c), c)[1]}
    with pytest.raises(RuntimeError, match=r"tensors\[0\] requires grad"):
        torch.vmap(calls[op])(x, torch.full((BATCH,), 0.5))
    assert_untouched([x.detach()], before)
    assert x.grad_fn.name() == "MulBackward0" and x._version == 0
    with torch.no_grad():
        torch.vmap(calls[op])(x, torch.full((BATCH,), 0.5))
    assert x._version > 0


# --------------------------------------------- found in review of the rules
def test_error_if_nonfinite_decides_per_sample_on_float64_norms():
    """Samples of float64 norm 1.5e308 (float32 inf, not an error, as the op
    alone decides) whose norm together passes the double range: no error."""
    require_kernel("cpu")
    x = torch.full((4, 3), 5e307, dtype=torch.float64)
    alone = x[0].clone()
    got = torch.vmap(lambda a: ops.clip_([a], 1.0, 1.0, True))(x)
    assert_same_bits(got, ops.clip_([alone], 1.0, 1.0, True).expand(4))
    assert_values_close(x, alone.expand(4, 3))


def test_inference_tensor_refused_before_any_sample_is_written():
    require_kernel("cpu")
    x = make_grads([(BATCH, 6)], torch.float32, seed=18, scale=3.0)[0]
    with torch.inference_mode():
        frozen = torch.randn(BATCH, 4)
    before = snapshot([x])
    for call in (lambda a, i: ops.clip_([a, i], 0.1, 2.0),
                 lambda a, i: (ops.multi_tensor_scale_([a, i], torch.full((), 0.5) * a.sum()), a)[1]):
        with pytest.raises(RuntimeError, match=r"tensors\[1\] is an inference tensor"):
            torch.vmap(call)(x, frozen)
        assert_untouched([x], before)


def test_nested_vmap_outer_norm_into_an_inner_only_tensor_is_refused():
    """y is batched at the inner level only, the norm at both: torch's
    multiply raised after x was clipped; the rule refuses before."""
    require_kernel("cpu")
    outer = make_grads([(3, BATCH, 6)], torch.float32, seed=19, scale=3.0)[0]
    inner_only = make_grads([(BATCH, 4)], torch.float32, seed=20, scale=3.0)[0]
    before = snapshot([outer, inner_only])
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is not batched while the norm is"):
        torch.vmap(lambda a: torch.vmap(lambda x, y: ops.clip_([x, y], 1.0, 2.0))(a, inner_only))(outer)
    assert_untouched([outer, inner_only], before)


@pytest.mark.parametrize("error_if_nonfinite", [False, True])
def test_nested_vmap_clip_grad_norm_like_torch(error_if_nonfinite):
    """Found in review: a coefficient batched at both levels was checked as
    a plain tensor and refused; error_if_nonfinite failed in eager vmap
    (the split path read the norm with item())."""
    require_kernel("cpu")
    grads = make_grads([(2, 3, 5)], torch.float32, seed=21, scale=3.0)[0]

    def clipped(module, **kwargs):
        def one(g):
            ps = make_params([g])
            module.clip_grad_norm_(ps, 1.0, **kwargs)
            return ps[0].grad
        return torch.vmap(torch.vmap(one))(grads)

    ours = clipped(fastclip, error_if_nonfinite=error_if_nonfinite)
    torch.testing.assert_close(ours, clipped(torch.nn.utils, foreach=False), rtol=1e-6, atol=0.0)


def test_clip_grad_norm_error_if_nonfinite_in_eager_vmap():
    require_kernel("cpu")
    grads = make_grads([(BATCH, 7)], torch.float32, seed=22, scale=3.0)[0]

    def one(g):
        ps = make_params([g])
        return fastclip.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True), ps[0].grad

    with _no_fallback():
        norms, clipped = torch.vmap(one)(grads)
    for b in range(BATCH):
        assert_values_close(clipped[b], one(grads[b])[1])
    grads[3, 2] = math.nan
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.vmap(one)(grads)


@pytest.mark.parametrize("fn", ["get_total_norm", "grad_norms"])
def test_functions_on_an_empty_batch(fn):
    require_kernel("cpu")
    calls = {"get_total_norm": lambda g: fastclip.get_total_norm([g]),
             "grad_norms": lambda g: fastclip.grad_norms(make_params([g]))}
    got = torch.vmap(calls[fn])(torch.randn(0, 3))
    assert all(t.shape[0] == 0 for t in torch.utils._pytree.tree_leaves(got))


# ------------------------------------------------ the C++ rules (csrc/batching.cpp)
# multi_tensor_norm and clip_ have C++ batching rules for the common case
# (every tensor batched at one level, no float64, orders 1, 2, inf); they
# hand everything else to the Python rules. They must give the Python
# rules' bits, and take only what they claim.
_PLAIN_SHAPES = [(BATCH, 3, 17), (7, BATCH), (2, 9, BATCH), (BATCH,), (BATCH, 0)]
_PLAIN_DIMS = [0, 1, 2, 0, 0]
_PLAIN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rule_info():
    import types
    return types.SimpleNamespace(batch_size=BATCH, randomness="error")


@contextlib.contextmanager
def _python_rule_calls(name):
    """Counts the calls of the Python rule that the C++ rule of ``name`` hands over."""
    from fastclip import _ops
    original = _ops.PYTHON_VMAP_RULES[name]
    calls = []

    def spy(*args):
        calls.append(1)
        return original(*args)

    _ops._C.set_vmap_rule(name, spy)
    try:
        yield calls
    finally:
        _ops._C.set_vmap_rule(name, original)


@pytest.mark.parametrize("dtype", _PLAIN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("ord", [1.0, 2.0, math.inf], ids=ord_id)
@pytest.mark.parametrize("per_tensor,fp64", [(True, False), (False, True), (True, True)])
def test_cpp_norm_rule_gives_the_python_rules_bits(dtype, ord, per_tensor, fp64):
    from fastclip import _ops
    values = make_grads(_PLAIN_SHAPES, dtype, "cpu", seed=3, scale=3.0)
    values[1][2, 1] = float("nan") if ord == 2.0 else values[1][2, 1]  # one NaN sample
    dims = tuple(_PLAIN_DIMS)
    with _python_rule_calls("multi_tensor_norm") as calls:
        total, each = torch.vmap(lambda *g: ops.multi_tensor_norm(list(g), ord, per_tensor, fp64), in_dims=dims)(*values)
    assert not calls, "the C++ rule handed a plain list to Python"
    (want_total, want_each), _ = _ops._multi_tensor_norm_vmap(
        _rule_info(), (list(dims), None, None, None, None), values, ord, per_tensor, fp64, 1)
    assert_same_bits(total, want_total)
    assert_same_bits(each, want_each)
    assert each.stride() == want_each.stride()  # found in review: a contiguous copy where Python leaves a view


def test_cpp_norm_rule_gives_the_python_rules_strides_for_one_tensor():
    from fastclip import _ops
    (x,) = make_grads([(BATCH, 6)], torch.float32, "cpu", seed=6)
    for per_tensor in (True, False):
        total, each = torch.vmap(lambda a: ops.multi_tensor_norm([a], 2.0, per_tensor))(x)
        (want_total, want_each), _ = _ops._multi_tensor_norm_vmap(
            _rule_info(), ([0], None, None, None, None), [x], 2.0, per_tensor, False, 1)
        assert_same_bits(each, want_each)
        assert each.stride() == want_each.stride()


@pytest.mark.parametrize("dtype", _PLAIN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("ord", [1.0, 2.0, math.inf], ids=ord_id)
def test_cpp_clip_rule_gives_the_python_rules_bits(dtype, ord):
    from fastclip import _ops
    values = make_grads(_PLAIN_SHAPES, dtype, "cpu", seed=4, scale=3.0)
    values[0][1].mul_(1e-3)  # a sample below max_norm: coefficient 1
    values[2][0, 0, 3] = float("inf")  # one sample's norm inf: coefficient 0
    dims = tuple(_PLAIN_DIMS)
    got, want = [v.clone() for v in values], [v.clone() for v in values]
    with _python_rule_calls("clip_") as calls:
        total = torch.vmap(lambda *g: ops.clip_(list(g), 0.5, ord), in_dims=dims)(*got)
    assert not calls, "the C++ rule handed a plain list to Python"
    want_total, _ = _ops._clip_vmap(_rule_info(), (list(dims), None, None, None), want, 0.5, ord, False)
    assert_same_bits(total, want_total)
    for g, w in zip(got, want):
        assert_same_bits(g, w)


def _nested(f):
    return lambda *g: torch.vmap(f)(*g)


@pytest.mark.parametrize(
    "case",
    ["shared", "float64", "order 3.5", "nested", "empty batch", "error_if_nonfinite", "requires grad", "expanded"],
)
def test_cpp_rules_hand_the_rest_to_python(case):
    """Each case the C++ rules leave reaches the Python rule (which the
    tests above check against the op called per sample)."""
    dtype = torch.float64 if case == "float64" else torch.float32
    batch = 0 if case == "empty batch" else BATCH
    x, y = make_grads([(batch, 4), (batch, 3)], dtype, "cpu", seed=5)
    ord = 3.5 if case == "order 3.5" else 2.0
    in_dims = (0, None) if case == "shared" else (0, 0)
    if case == "nested":
        x, y = x.unsqueeze(0).expand(2, batch, 4).clone(), y.unsqueeze(0).expand(2, batch, 3).clone()
    if case == "expanded":
        y = y[:1].expand(batch, 3)
    if case == "requires grad":
        x.requires_grad_(True)
    if case in ("shared", "float64", "order 3.5", "nested", "empty batch"):
        wrap = _nested if case == "nested" else (lambda f: f)
        with _python_rule_calls("multi_tensor_norm") as calls:
            torch.vmap(wrap(lambda a, b: ops.multi_tensor_norm([a, b], ord, True)), in_dims=in_dims)(x, y)
        assert calls
    before = snapshot([x, y])
    with _python_rule_calls("clip_") as calls:
        f = lambda a, b: ops.clip_([a, b], 0.5, ord, case == "error_if_nonfinite")
        if case in ("requires grad", "expanded"):
            with pytest.raises(RuntimeError, match="requires grad" if case == "requires grad" else "share memory"):
                torch.vmap(f, in_dims=in_dims)(x, y)
            assert_untouched([x, y], before)
        elif case == "shared":
            with pytest.raises(RuntimeError, match="is not batched"):
                torch.vmap(f, in_dims=in_dims)(x, y)
        else:
            torch.vmap(_nested(f) if case == "nested" else f, in_dims=in_dims)(x, y)
    assert calls


@pytest.mark.parametrize("between", ["grad", "jvp"])
def test_cpp_rules_pass_down_tensors_batched_only_at_an_outer_level(between):
    """Found in review: under vmap(grad(vmap(f))) the C++ rules took the
    level of tensors batched only at the outer vmap for the current one and
    ran their ops through the grad layer, which refused the in-place
    multiply (clip_) or failed an internal assert (the norm). Such calls go
    to the Python rule, which passes them down to their level."""
    from torch.func import grad, jvp
    x = make_grads([(3, 4)], torch.float32, "cpu", seed=7, scale=5.0)[0]
    y = make_grads([(3, 2, 2)], torch.float32, "cpu", seed=8)[0]
    want = torch.stack([ops.clip_([row.clone()], 1.0, 2.0) for row in x])
    clipped = x.clone()
    norms = []

    def inner(a, yy):
        norms.append(ops.multi_tensor_norm([a], 2.0, False)[0])
        ops.clip_([a], 1.0, 2.0)
        return yy.sin().sum()

    def outer(a, b):
        f = lambda y0: torch.vmap(lambda yy: inner(a, yy))(y0).sum()
        if between == "grad":
            return grad(f)(b)
        return jvp(f, (b,), (torch.ones_like(b),))[1]

    with _python_rule_calls("clip_") as clip_calls, _python_rule_calls("multi_tensor_norm") as norm_calls:
        torch.vmap(outer)(clipped, y)
    assert clip_calls and norm_calls
    assert_values_close(clipped, x * (1.0 / (want.double() + 1e-6)).clamp(max=1.0).to(x.dtype)[:, None])


def test_cpp_norm_rule_under_functionalize_returns_a_plain_tensor():
    """Found in review: vmap(functionalize(vmap(norm))) of tensors batched
    at the outer level returned a functional tensor to the caller."""
    from torch.func import functionalize
    x = make_grads([(3, 4)], torch.float32, "cpu", seed=9)[0]
    y = make_grads([(3, 2)], torch.float32, "cpu", seed=10)[0]
    f = lambda a, b: functionalize(lambda bb: torch.vmap(lambda c: ops.multi_tensor_norm([a], 2.0, False)[0] * c)(bb))(b)
    out = torch.vmap(f)(x, y)
    assert not torch._is_functional_tensor(out)
    torch.testing.assert_close(out, x.double().norm(dim=1).float()[:, None] * y)


def _fwd_norm(module, grads, kw):
    return (module.get_total_norm(list(grads), 2.0, **kw),)


def _fwd_clip(module, grads, kw):
    # Each gradient as the .grad of a detached alias (as the per-sample
    # benchmark clips): the clipped gradient is the input, its tangent too.
    params = [g.detach() for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    return (module.clip_grad_norm_(params, 1.0, **kw), *[p.grad for p in params])


def _fwd_clip_value(module, grads, kw):
    params = [g.detach() for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    module.clip_grad_value_(params, 0.75, **kw)
    return tuple(p.grad for p in params)


_FWD_VMAP_CALLS = {"get_total_norm": _fwd_norm, "clip_grad_norm_": _fwd_clip, "clip_grad_value_": _fwd_clip_value}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("nesting", ["jvp(vmap)", "vmap(jvp)"])
@pytest.mark.parametrize("call", list(_FWD_VMAP_CALLS), ids=list(_FWD_VMAP_CALLS))
def test_forward_ad_with_vmap_like_torch(call, nesting, dtype):
    """Forward-mode AD together with vmap: in jvp(vmap(f)) the gradients are
    batched duals, which the ops' batching rules handed to the ops, which
    refused their tangents; and in vmap(jvp(f)) the in-place functions
    failed on torch.func's wrappers (their storage checked, the clip's
    coefficient read with item()). Both now take plain PyTorch. Primals
    and tangents against torch's foreach=False functions on float64
    copies, within a few ulps of the dtype (torch's own bf16 tangents are
    off by 6% in places: not the reference)."""
    from torch.func import jvp

    grads = make_grads([(BATCH, 3, 4), (BATCH, 5)], dtype, "cpu", seed=11, scale=3.0)
    tangents = make_grads([(BATCH, 3, 4), (BATCH, 5)], dtype, "cpu", seed=12)

    def results(module, kw, cast):
        f = lambda *gs: _FWD_VMAP_CALLS[call](module, gs, kw)
        primals, dirs = tuple(cast(g) for g in grads), tuple(cast(t) for t in tangents)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if nesting == "jvp(vmap)":
                return jvp(torch.vmap(f), primals, dirs)
            n = len(primals)
            return torch.vmap(lambda *gt: jvp(f, gt[:n], gt[n:]))(*primals, *dirs)

    ours = results(fastclip, {}, torch.clone)
    want = results(torch.nn.utils, {"foreach": False}, lambda t: t.double())
    for got_part, want_part in zip(ours, want):  # (primals, tangents)
        assert len(got_part) == len(want_part)
        for g, w in zip(got_part, want_part):
            assert g.shape == w.shape
            # The norm is float32 for every dtype; clipped values have theirs.
            assert g.dtype == (torch.float32 if g.dim() == 1 else dtype)
            tol = 4 * (torch.finfo(g.dtype).eps if g.dim() > 1 else 2.0**-23)
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * float(w.abs().max()))
    # Tangents that are not all zero (zeros on both sides would prove nothing).
    assert any(bool(t.ne(0).any()) for t in ours[1])


def test_ops_under_jvp_of_vmap_refuse_the_tangents_before_writing():
    """The ops themselves do not propagate tangents: called directly under
    jvp(vmap), the batching rules hand the duals to them and they refuse,
    naming the tensor, with nothing written."""
    from torch.func import jvp
    x = make_grads([(BATCH, 6)], torch.float32, "cpu", seed=13, scale=4.0)[0]
    before = x.clone()

    def f(a):
        ops.clip_([a], 1.0, 2.0, False)
        return a

    with pytest.raises(RuntimeError, match=r"fastclip::clip_: tensors\[0\] carries a forward-mode AD tangent"):
        jvp(torch.vmap(f), (x,), (torch.ones_like(x),))
    assert torch.equal(x, before)
    with pytest.raises(RuntimeError, match=r"fastclip::multi_tensor_norm: tensors\[0\] carries a forward-mode"):
        jvp(torch.vmap(lambda a: ops.multi_tensor_norm([a], 2.0, False)[0]), (x,), (torch.ones_like(x),))
