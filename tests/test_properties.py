"""Property tests: random lists of tensors against the float64 reference.

Lists hold 0 to 6 tensors of 0 to 3 dimensions (each of size 0 to 40), each
of a random dtype among the four, with values randn * 10**k, k in [-3, 3].
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
    assert_norm_close,
    assert_scaled_close,
    make_params,
    ref_coef,
    ref_norm,
    ref_norms_each,
    ref_scaled,
)

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)



@st.composite
def tensor_lists(draw):
    specs = draw(
        st.lists(
            st.tuples(
                st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
                st.sampled_from(DTYPES),
                st.integers(-3, 3),
                st.integers(0, 2**31 - 1),
            ),
            min_size=0,
            max_size=6,
        )
    )
    tensors = []
    for shape, dtype, exponent, seed in specs:
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        tensors.append((values * 10.0**exponent).to(dtype))
    return tensors


# 0.5 and 1500: a general p below 1, and one whose powers of values below
# 1 underflow a double (the scaled sums).
orders = st.sampled_from([1.0, 2.0, 3.5, math.inf, 0.5, 1500.0])


def _close(actual, expected):
    # The shared norm tolerance, against the reference as float32 holds it.
    assert_norm_close(actual, expected.to(torch.float32))


@PROPERTY_SETTINGS
@given(tensors=tensor_lists(), ord=orders)
def test_get_total_norm_property(tensors, ord):
    before = [t.clone() for t in tensors]
    total = fastclip.get_total_norm(tensors, ord)
    assert total.shape == ()
    _close(total, ref_norm(tensors, ord))
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


@PROPERTY_SETTINGS
@given(tensors=tensor_lists(), ord=orders)
def test_grad_norms_property(tensors, ord):
    params = make_params(tensors)
    total, each = fastclip.grad_norms(params, ord)
    _close(total, ref_norm(tensors, ord))
    assert each.shape == (len(tensors),)
    _close(each, ref_norms_each(tensors, ord))


@PROPERTY_SETTINGS
@given(tensors=tensor_lists(), ord=orders, fraction=st.floats(0.05, 2.0))
def test_clip_grad_norm_property(tensors, ord, fraction):
    params = make_params(tensors)
    norm = ref_norm(tensors, ord)
    max_norm = fraction * norm.item()

    total = fastclip.clip_grad_norm_(params, max_norm, ord)

    _close(total, norm)
    coef = ref_coef(max_norm, norm)
    for p, t in zip(params, tensors):
        assert p.grad.dtype == t.dtype
        assert_scaled_close(p.grad, ref_scaled(t, coef))
