"""Property tests: random lists of tensors against the float64 reference.

Lists hold 0 to 6 tensors of 0 to 3 dimensions (each of size 0 to 40, or one
dimension past a 64 Ki-element chunk), each of a random dtype among the
four, with values randn * 10**k, k in [-3, 3], a few elements replaced by
NaN, +-inf, a huge value (1e30 in float32: its square overflows), the
dtype's largest or its smallest subnormal, and each tensor in a random
layout: contiguous, at an element offset, with gaps, or transposed. The
memory around and between a view's elements holds NaN, which a read would
carry into the norm and which a write must leave (found in review: the
lists had none of these).
"""
from __future__ import annotations

import math

import pytest
import torch

# CI installs hypothesis; a machine without it (the GPU machines have no
# network) skips this file instead of failing the whole collection.
pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastclip  # noqa: E402
from testing import (
    DTYPES,
    assert_identical,
    assert_norm_close,
    assert_scaled_close,
    ref_coef,
    ref_norm,
    ref_norms_each,
    ref_scaled,
)

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)
CHUNK = 65536  # elements: the CPU kernels' chunk (and the CUDA one)
SPECIALS = ["nan", "inf", "-inf", "huge", "max", "tiny"]
LAYOUTS = ["contiguous", "offset", "gaps", "transposed"]


def _special(name: str, dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "max": info.max, "tiny": info.tiny * info.eps,
            "huge": {torch.float16: 60000.0, torch.float64: 1e300}.get(dtype, 1e30)}[name]


def _laid_out(values: torch.Tensor, layout: str):
    """``values`` in ``layout``, and the buffer it lies in when that buffer
    has other elements (NaN), or None."""
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(0, -1).contiguous().transpose(0, -1), None
    if layout not in ("offset", "gaps") or values.numel() == 0:
        return values, None
    step = 2 if layout == "gaps" else 1
    base = torch.full((values.numel() * step + 1,), math.nan, dtype=values.dtype)
    strides = [step * s for s in torch.empty(values.shape).stride()]
    view = base.as_strided(values.shape, strides, 1)
    view.copy_(values)
    return view, base


def _outside(view: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The elements of ``base`` that ``view`` does not hold."""
    held = torch.zeros(base.numel(), dtype=torch.bool)
    index = torch.arange(base.numel()).as_strided(view.shape, view.stride(), view.storage_offset())
    held[index.reshape(-1)] = True
    return base[~held]


@st.composite
def tensor_lists(draw):
    small = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
    past_a_chunk = st.integers(CHUNK - 7, CHUNK + 300).map(lambda n: (n,))
    specs = draw(
        st.lists(
            st.tuples(
                st.one_of(small, small, small, past_a_chunk),
                st.sampled_from(DTYPES),
                st.integers(-3, 3),
                st.integers(0, 2**31 - 1),
                st.lists(st.tuples(st.integers(0, 2**20), st.sampled_from(SPECIALS)), max_size=2),
                st.sampled_from(LAYOUTS),
            ),
            min_size=0,
            max_size=6,
        )
    )
    tensors, bases = [], []
    for shape, dtype, exponent, seed, specials, layout in specs:
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        values = (values * 10.0**exponent).to(dtype)
        for position, name in specials:
            if values.numel() > 0:
                values.view(-1)[position % values.numel()] = _special(name, dtype)
        view, base = _laid_out(values, layout)
        tensors.append(view)
        bases.append(base)
    return tensors, bases


def _params_of(tensors):
    """Parameters whose gradients are these very tensors (views and all)."""
    params = []
    for t in tensors:
        p = torch.nn.Parameter(torch.zeros(t.shape, dtype=t.dtype))
        p.grad = t
        params.append(p)
    return params


def _check_outside_untouched(tensors, bases):
    for view, base in zip(tensors, bases):
        if base is not None:
            assert _outside(view, base).isnan().all()


# 0.5 and 1500: a general p below 1, and one whose powers of values below
# 1 underflow a double (the scaled sums).
orders = st.sampled_from([1.0, 2.0, 3.5, math.inf, 0.5, 1500.0])


def _close(actual, expected):
    # The shared norm tolerance, against the reference as float32 holds it.
    assert_norm_close(actual, expected.to(torch.float32))


@PROPERTY_SETTINGS
@given(lists=tensor_lists(), ord=orders)
def test_get_total_norm_property(lists, ord):
    tensors, bases = lists
    before = [t.clone() for t in tensors]
    total = fastclip.get_total_norm(tensors, ord)
    assert total.shape == ()
    _close(total, ref_norm(tensors, ord))
    for t, b in zip(tensors, before):
        assert_identical(t, b)
    _check_outside_untouched(tensors, bases)


@PROPERTY_SETTINGS
@given(lists=tensor_lists(), ord=orders)
def test_grad_norms_property(lists, ord):
    tensors, _ = lists
    params = _params_of(tensors)
    total, each = fastclip.grad_norms(params, ord)
    _close(total, ref_norm(tensors, ord))
    assert each.shape == (len(tensors),)
    _close(each, ref_norms_each(tensors, ord))


@PROPERTY_SETTINGS
@given(lists=tensor_lists(), ord=orders, fraction=st.one_of(st.just(0.0), st.floats(0.05, 2.0)))
def test_clip_grad_norm_property(lists, ord, fraction):
    tensors, bases = lists
    params = _params_of(tensors)
    norm = ref_norm(tensors, ord)
    # A fraction of a finite norm (max_norm 0 too); of a NaN or inf one, or
    # where the product overflows (a norm near the largest double), the
    # fraction itself (max_norm must be finite).
    max_norm = fraction * norm.item() if math.isfinite(norm.item()) else fraction
    max_norm = max_norm if math.isfinite(max_norm) else fraction
    expected = [ref_scaled(t, ref_coef(max_norm, norm)) for t in tensors]

    total = fastclip.clip_grad_norm_(params, max_norm, ord)

    _close(total, norm)
    for p, t, e in zip(params, tensors, expected):
        assert p.grad is t and p.grad.dtype == t.dtype
        assert_scaled_close(p.grad, e)
    _check_outside_untouched(tensors, bases)


@PROPERTY_SETTINGS
@given(lists=tensor_lists(), max_norm=st.floats(0.0, 1e6), total=st.floats(0.0, 1e8),
       total_kind=st.sampled_from(["float", "float32", "float64"]))
def test_clip_grads_with_norm_property(lists, max_norm, total, total_kind):
    tensors, bases = lists
    params = _params_of(tensors)
    given_total = total if total_kind == "float" else torch.tensor(total, dtype=getattr(torch, total_kind))
    coef = ref_coef(max_norm, torch.as_tensor(given_total, dtype=torch.float64))
    expected = [ref_scaled(t, coef) for t in tensors]

    assert fastclip.clip_grads_with_norm_(params, max_norm, given_total) is None

    for p, t, e in zip(params, tensors, expected):
        assert p.grad is t
        assert_scaled_close(p.grad, e)
    _check_outside_untouched(tensors, bases)


@PROPERTY_SETTINGS
@given(lists=tensor_lists(), clip_value=st.one_of(st.just(0.0), st.floats(1e-6, 1e6), st.just(math.inf)))
def test_clip_grad_value_property(lists, clip_value):
    tensors, bases = lists
    params = _params_of(tensors)
    # Clamped in float64, then rounded to the dtype: exact, NaN kept; a
    # clip_value beyond the dtype's range clamps to it rounded (README).
    expected = [t.double().clamp(-clip_value, clip_value).to(t.dtype) for t in tensors]

    assert fastclip.clip_grad_value_(params, clip_value) is None

    for p, t, e in zip(params, tensors, expected):
        assert p.grad is t
        assert_identical(p.grad, e)
    _check_outside_untouched(tensors, bases)
