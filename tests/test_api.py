"""The public functions against ``torch.nn.utils`` and the float64 reference.

Where torch is accurate (fp32/fp64 gradients of ordinary size) fastclip must
give torch's results. Where torch is not (bf16/fp16 norms rounded to the
gradient dtype, sums of squares that overflow fp32) fastclip is held to the
float64 reference instead, and the tests also assert what torch does, to
document the difference.
"""
from __future__ import annotations

import itertools
import math
import sys
import warnings

import pytest
import torch

import fastclip
import fastclip.clip
from fastclip import _fallback
from testing import (
    check_norm_paths,
    filled,
    DEVICE_PARAMS,
    DTYPES,
    HAS_CUDA,
    LOW_PRECISION,
    ORDS,
    assert_identical,
    assert_norm_close,
    assert_same_bits,
    assert_scaled_close,
    assert_untouched,
    clone_params,
    dtype_id,
    make_grads,
    make_params,
    ord_id,
    ref_coef,
    ref_norm,
    require_kernel,
    ref_norms_each,
    ref_scaled,
    snapshot,
)

TORCH_RTOL = 1e-5  # fastclip vs torch where torch is accurate (fp32/fp64)
ACCURATE = [torch.float32, torch.float64]

SHAPES = [(17,), (4, 9), (), (3, 0), (2, 3, 5), (123,)]
# torch's inf-norm refuses 0-size tensors ("does not have an identity"), so
# comparisons with torch at ord=inf leave the 0-size gradient out;
# test_inf_norm_with_empty_tensor covers it against the reference.
SHAPES_NO_EMPTY = [s for s in SHAPES if math.prod(s) > 0 or s == ()]


def _shapes_for(ord):
    return SHAPES_NO_EMPTY if ord == math.inf else SHAPES


def _params(dtype=torch.float32, seed=0, scale=1.0, with_none=True, shapes=SHAPES):
    """Parameters with the SHAPES gradients, and one without a gradient in the middle."""
    grads = make_grads(shapes, dtype, "cpu", seed=seed, scale=scale)
    if with_none:
        grads.insert(2, None)
    return make_params(grads)


def _grads(params):
    return [p.grad for p in params if p.grad is not None]


def _assert_grads_match_torch(params, torch_params, rtol=TORCH_RTOL):
    for p, q in zip(params, torch_params):
        if q.grad is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=1e-30, equal_nan=True)


def _assert_grads_scaled(params, before, coef):
    for p, g in zip(params, before):
        if g is None:
            assert p.grad is None
        else:
            assert_scaled_close(p.grad, ref_scaled(g, coef))


@pytest.fixture
def fresh_warnings(monkeypatch):
    """fastclip warns once per reason per process; start each test afresh."""
    monkeypatch.setattr(fastclip.clip, "_warned", set())


# ------------------------------------------------------- against torch
@pytest.mark.parametrize("max_norm_factor", [0.3, 10.0], ids=["clips", "no_clip"])
@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", ACCURATE, ids=dtype_id)
def test_clip_grad_norm_matches_torch(dtype, ord, max_norm_factor):
    params = _params(dtype, seed=1, shapes=_shapes_for(ord))
    torch_params = clone_params(params)
    max_norm = max_norm_factor * ref_norm(_grads(params), ord).item()

    total = fastclip.clip_grad_norm_(params, max_norm, ord)
    expected = torch.nn.utils.clip_grad_norm_(torch_params, max_norm, ord)

    assert total.dtype == torch.float32 and total.shape == ()
    torch.testing.assert_close(total.double(), expected.double(), rtol=TORCH_RTOL, atol=0)
    _assert_grads_match_torch(params, torch_params)


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", ACCURATE, ids=dtype_id)
def test_get_total_norm_matches_torch(dtype, ord):
    grads = make_grads(_shapes_for(ord), dtype, seed=2)
    before = snapshot(grads)
    total = fastclip.get_total_norm(grads, ord)
    expected = torch.nn.utils.get_total_norm(grads, ord)
    assert total.dtype == torch.float32 and total.shape == ()
    torch.testing.assert_close(total.double(), expected.double(), rtol=TORCH_RTOL, atol=0)
    assert_untouched(grads, before)


@pytest.mark.parametrize("total_kind", ["tensor", "float"])
@pytest.mark.parametrize("max_norm_factor", [0.3, 10.0], ids=["clips", "no_clip"])
@pytest.mark.parametrize("dtype", ACCURATE, ids=dtype_id)
def test_clip_grads_with_norm_matches_torch(dtype, max_norm_factor, total_kind):
    params = _params(dtype, seed=3)
    torch_params = clone_params(params)
    total = torch.nn.utils.get_total_norm(_grads(params))
    max_norm = max_norm_factor * total.item()
    given = total if total_kind == "tensor" else total.item()

    assert fastclip.clip_grads_with_norm_(params, max_norm, given) is None
    torch.nn.utils.clip_grads_with_norm_(torch_params, max_norm, total)

    _assert_grads_match_torch(params, torch_params)


@pytest.mark.parametrize("clip_value", [0.5, 0.1, 0.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_clip_grad_value_matches_torch(dtype, clip_value):
    params = _params(dtype, seed=4, scale=2.0)
    params[0].grad[3] = math.nan
    params[0].grad[5] = math.inf
    params[1].grad[1, 2] = -math.inf
    torch_params = clone_params(params)

    assert fastclip.clip_grad_value_(params, clip_value) is None
    torch.nn.utils.clip_grad_value_(torch_params, clip_value)

    for p, q in zip(params, torch_params):
        if q.grad is not None:
            assert_identical(p.grad, q.grad)
    assert torch.isnan(params[0].grad[3])


# --------------------------------------- bf16/fp16 against the reference
@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_low_precision_against_reference(dtype, ord):
    params = _params(dtype, seed=5, scale=3.0)
    grads = _grads(params)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    norm = ref_norm(grads, ord)
    max_norm = 0.25 * norm.item()

    assert_norm_close(fastclip.get_total_norm(grads, ord), norm, dtype)
    total, each = fastclip.grad_norms(params, ord)
    assert_norm_close(total, norm, dtype)
    total = fastclip.clip_grad_norm_(params, max_norm, ord)

    assert_norm_close(total, norm, dtype)
    _assert_grads_scaled(params, before, ref_coef(max_norm, norm))


@pytest.mark.parametrize("max_norm", [7.0, 0.0])
@pytest.mark.parametrize("total_kind", ["float32", "float64", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_clip_grads_with_norm_against_reference(dtype, total_kind, max_norm):
    # Every dtype, to the reference's tolerance (the comparison with torch
    # is looser; found in review: a coefficient rounded to float32 for fp64
    # gradients passed), with a norm that float32 cannot hold exactly, and
    # max_norm 0 (every gradient zeroed, as torch does).
    params = _params(dtype, seed=6, scale=3.0)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    value = 123.456789012345
    total = value if total_kind == "float" else torch.tensor(value, dtype=getattr(torch, total_kind))
    fastclip.clip_grads_with_norm_(params, max_norm, total)
    _assert_grads_scaled(params, before, ref_coef(max_norm, torch.as_tensor(total, dtype=torch.float64)))


def test_bf16_norm_closer_to_reference_than_torch():
    grads = make_grads([(1000,), (37, 41), (5,)], torch.bfloat16, seed=7, scale=3.0)
    norm = ref_norm(grads).item()
    ours = fastclip.get_total_norm(grads).item()
    theirs = torch.nn.utils.get_total_norm(grads)
    assert theirs.dtype == torch.bfloat16  # torch rounds the norm to bf16 ...
    ours_err, theirs_err = abs(ours - norm), abs(theirs.item() - norm)
    assert ours_err <= 1e-6 * norm  # ... fastclip keeps float32 accuracy
    assert ours_err < theirs_err


# ------------------------------------------------------ argument forms
def _generator(params):
    return (p for p in params)


_FORMS = {
    "list": list,
    "generator": lambda ps: _generator(ps),
    "tensor": lambda ps: ps[0],
    # One-shot iterators of other kinds (the API reads the argument in
    # two places: the C++ gathering, then the Python one; found in review).
    "iter": iter,
    "filter": lambda ps: filter(lambda p: True, ps),
    "map": lambda ps: map(lambda p: p, ps),
    "chain": lambda ps: itertools.chain(ps[:1], ps[1:]),
    "tuple": tuple,
}


@pytest.mark.parametrize("split", [False, True], ids=["one_call", "split"])
@pytest.mark.parametrize("form", list(_FORMS))
@pytest.mark.parametrize(
    "fn", ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_", "grad_norms"]
)
def test_tensor_or_iterable_arguments(fn, form, split):
    if split and form == "tensor":
        pytest.skip("one tensor is not a list with a sparse gradient among others")

    def run(params, form):
        arg = _FORMS[form](params)
        if fn == "clip_grad_norm_":
            return fastclip.clip_grad_norm_(arg, torch.tensor(0.5) if split else 0.5)
        if fn == "get_total_norm":
            return fastclip.get_total_norm(_FORMS[form](_grads(params)))
        if fn == "clip_grads_with_norm_":
            return fastclip.clip_grads_with_norm_(arg, 0.5, torch.tensor(4.0))
        if fn == "clip_grad_value_":
            return fastclip.clip_grad_value_(arg, 0.2)
        return fastclip.grad_norms(arg)

    params = _params(seed=8, with_none=False)
    if split:
        # A sparse gradient: the split path (kernels plus plain PyTorch).
        params.insert(1, make_params([_sparse(torch.float32, True)])[0])
    reference = clone_params(params if form != "tensor" else params[:1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fastclip", category=UserWarning)
        got = run(params, form)
        # A plain list of exactly what the other form covers (found in
        # review: the reference took the same form, so a form read as empty
        # matched itself).
        expected = run(reference, "list")
    if got is not None:
        as_tuple = (lambda r: r if isinstance(r, tuple) else (r,))
        for g, e in zip(as_tuple(got), as_tuple(expected)):
            assert_same_bits(g, e)
    dense = lambda t: t.to_dense() if t.is_sparse else t  # noqa: E731
    for p, q in zip(params, reference):
        assert p.grad.layout == q.grad.layout
        assert_same_bits(dense(p.grad), dense(q.grad))
    if form == "tensor":
        untouched = _params(seed=8, with_none=False)
        for p, q in zip(params[1:], untouched[1:]):
            assert_same_bits(p.grad, q.grad)


def test_empty_generator_warns_as_torch_does():
    # torch warns since 2.8 (pytorch/pytorch#151529; 2.6 does not): fastclip on every torch.
    torch_warns = fastclip._torch_release(torch.__version__) >= (2, 8)
    torch_too = (torch.nn.utils.clip_grad_norm_,) if torch_warns else ()
    for clip in (fastclip.clip_grad_norm_,) + torch_too:
        with pytest.warns(UserWarning, match="`parameters` is an empty generator") as seen:
            total = clip((p for p in []), 1.0)
        assert seen[0].filename == __file__  # the caller's line, through the no_grad wrapper
        assert_same_bits(total, torch.tensor(0.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastclip.clip_grad_norm_([], 1.0)  # an empty list is not a generator: no warning
        fastclip.clip_grad_norm_((p for p in _params(seed=8, with_none=False)), 1.0)  # nor a full one


@pytest.mark.parametrize("max_norm_factor", [0.3, 10.0], ids=["clips", "no_clip"])
def test_deprecated_clip_grad_norm_alias_like_torch(max_norm_factor):
    # torch keeps the old name with a FutureWarning; so does fastclip, so
    # that code using it keeps working after the switch.
    params = _params(torch.float32, seed=1, shapes=_shapes_for(2.0))
    torch_params = clone_params(params)
    max_norm = max_norm_factor * ref_norm(_grads(params), 2.0).item()
    with pytest.warns(FutureWarning, match="`fastclip.clip_grad_norm` is now deprecated") as seen:
        total = fastclip.clip_grad_norm(params, max_norm, 2.0, False, None)
    assert seen[0].filename == __file__
    with pytest.warns(FutureWarning, match="clip_grad_norm` is now deprecated"):
        expected = torch.nn.utils.clip_grad_norm(torch_params, max_norm, 2.0, False, None)
    torch.testing.assert_close(total.double(), expected.double(), rtol=TORCH_RTOL, atol=0)
    _assert_grads_match_torch(params, torch_params)
    with pytest.raises(ValueError, match="max_norm"), pytest.warns(FutureWarning):
        fastclip.clip_grad_norm(params, -1.0)
    # The marker type checkers read (PEP 702), as on torch's alias.
    assert "deprecated" in fastclip.clip_grad_norm.__deprecated__
    assert "deprecated" in torch.nn.utils.clip_grad_norm.__deprecated__


def test_fallback_warning_points_at_the_caller(fresh_warnings):
    params = _params(seed=8, with_none=False) + make_params([torch.ones(3, dtype=torch.complex64)])
    with pytest.warns(UserWarning, match="fastclip: computing with plain PyTorch") as seen:
        fastclip.clip_grad_norm_(params, 0.5)
    assert seen[0].filename == __file__
    # Through the deprecated alias, whose wrapper is typing_extensions' (found in review).
    fastclip.clip._warned.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fastclip.clip_grad_norm(params, 0.5)
        fastclip.clip_grad_norm((p for p in ()), 0.5)  # torch's warning for an empty generator
    assert len(seen) == 4 and [w.filename for w in seen] == [__file__] * 4, [(w.filename, str(w.message)) for w in seen]
    # Through an optimizer's step, whose hooks wrapper is torch's code.
    fastclip.clip._warned.clear()
    opt = fastclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), max_norm=0.5)
    with pytest.warns(UserWarning, match="fastclip: computing with plain PyTorch") as seen:
        opt.step()
    assert seen[0].filename == __file__


def test_split_path_refuses_inference_gradient_before_writing(fresh_warnings):
    # A complex gradient sends the list to the split path, where the
    # fallback's torch ops would raise only after the other parts are written.
    params = _params(seed=8, with_none=False) + [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]
    with torch.inference_mode():
        params[-1].grad = frozen = torch.full((3,), 3.0 + 0j, dtype=torch.complex64)
    assert params[-1].grad.is_inference()
    before = snapshot(_grads(params)[:-1])
    for call in (lambda: fastclip.clip_grad_norm_(params, 0.1), lambda: fastclip.clip_grad_value_(params, 0.1),
                 lambda: fastclip.clip_grads_with_norm_(params, 0.1, torch.tensor(5.0))):
        with pytest.raises(RuntimeError, match="is an inference tensor"):
            call()
        assert_untouched(_grads(params)[:-1], before)
        assert torch.equal(frozen, torch.full((3,), 3.0 + 0j, dtype=torch.complex64))


def _freed_view():
    flat = torch.ones(1000)
    view = flat[500:]
    flat.untyped_storage().resize_(100)  # 25 floats left under a view of 500
    return view


# Gradients a part of the split path refuses: the kernels (an expanded or a
# freed dense tensor) or the fallback's torch ops, while writing (an
# expanded complex one), each listed after a part that would be written first.
_UNWRITABLE = {
    "expanded-after-fallback": (lambda: [_sparse(torch.float32, True), torch.ones(4), torch.full((1,), 7.0).expand(3)],
                                r"gradient 2 .*share memory"),
    "freed-after-fallback": (lambda: [_sparse(torch.float32, True), _freed_view()],
                             r"gradient 1 .*beyond the memory of its storage"),
    "expanded-complex-after-kernels": (lambda: [torch.ones(4), torch.full((1,), 7.0 + 1j).expand(3)],
                                       r"gradient 1 .*share memory"),
    # Found in review: the pre-write check skipped non-strided tensors
    # entirely, and the fallback's dtypes were only tried while writing.
    "sparse-inference-after-kernels": (lambda: [torch.ones(4), _inference(lambda: _sparse(torch.float32, True))],
                                       r"gradient 1 .*inference tensor"),
    "float8-after-kernels": (lambda: [torch.ones(4), torch.full((3,), 2.0).to(torch.float8_e4m3fn)],
                             r"gradient 1 .*float8_e4m3fn on cpu, which torch's (mul_|clamp_) cannot write"),
}


def _inference(build):
    with torch.inference_mode():
        return build()
_WRITERS = {
    "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 0.1),
    "clip_grad_norm_-error_if_nonfinite": lambda ps: fastclip.clip_grad_norm_(ps, 0.1, error_if_nonfinite=True),
    "clip_grads_with_norm_": lambda ps: fastclip.clip_grads_with_norm_(ps, 0.1, torch.tensor(5.0)),
    "clip_grad_value_": lambda ps: fastclip.clip_grad_value_(ps, 0.1),
}


@pytest.mark.parametrize("writer", list(_WRITERS), ids=list(_WRITERS))
@pytest.mark.parametrize("case", list(_UNWRITABLE), ids=list(_UNWRITABLE))
def test_split_path_refuses_unwritable_gradient_before_writing(case, writer, fresh_warnings):
    # The split path writes its parts one after the other: a gradient that a
    # later part refuses must stop the call before any part is written.
    build, match = _UNWRITABLE[case]
    grads = build()
    if writer == "clip_grad_value_" and grads[-1].is_complex():
        pytest.skip("complex gradients are refused by clip_grad_value_'s own check")
    params = []
    for g in grads:  # the gradients themselves (make_params would clone them whole)
        params.append(torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype)))
        params[-1].grad = g
    writable = grads[:-1]
    before = [g.to_dense().clone() for g in writable]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's once-only notice
        # A dtype torch cannot write is a TypeError; every other refusal a RuntimeError.
        with pytest.raises(TypeError if case.startswith("float8") else RuntimeError, match=match):
            _WRITERS[writer](params)
    for g, b in zip(writable, before):
        assert_identical(g.to_dense(), b)


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "after-sparse"])
def test_negative_bit_views_are_clipped_one_by_one(alone, fresh_warnings):
    # torch's Negative fallback refuses in-place ops on a list holding a
    # torch._neg_view; such a view goes to the plain-PyTorch part (found in
    # review: after a sparse part had been written, the kernels' op raised).
    grads = ([] if alone else [_sparse(torch.float32, True)]) + [torch._neg_view(torch.full((4,), 10.0))]
    refs = [g.clone() if g.layout == torch.strided else g.to_dense() for g in grads]
    params = []
    for g in grads:
        params.append(torch.nn.Parameter(torch.zeros(g.shape)))
        params[-1].grad = g
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = fastclip.clip_grad_norm_(params, 1.0)
    expected = ref_norm(refs, 2.0)
    assert_norm_close(total, expected)
    coef = ref_coef(1.0, expected).item()
    for p, r in zip(params, refs):
        assert torch.allclose(p.grad.to_dense(), r * coef, rtol=1e-6, atol=0.0)
    assert params[-1].grad.is_neg() and (params[-1].grad < 0).all()


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_conjugate_view_gradients_clipped_as_torchs_loop(fn, fresh_warnings):
    """torch's foreach path refuses a mutable list of conjugate views
    (found in review); fastclip takes them, conjugate bit kept, with the
    bits of torch's foreach=False path."""
    def params():
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        p.grad = torch.tensor([3 + 4j, 4, 12], dtype=torch.complex64).conj()
        q = torch.nn.Parameter(torch.zeros(2))
        q.grad = torch.tensor([1.0, -2.0])
        return [p, q]
    ours, theirs = params(), params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the split path's notice
        if fn == "clip_grad_norm_":
            total = fastclip.clip_grad_norm_(ours, 1.0)
            expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=False)
            assert_norm_close(total, ref_norm([p.grad.resolve_conj() for p in params()], 2.0))
            assert total.item() == pytest.approx(expected.item(), rel=TORCH_RTOL)
        else:
            fastclip.clip_grads_with_norm_(ours, 1.0, torch.tensor(13.0))
            torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, torch.tensor(13.0), foreach=False)
    assert ours[0].grad.is_conj()
    for a, b in zip(ours, theirs):
        assert_same_bits(a.grad.resolve_conj(), b.grad.resolve_conj())


def test_clip_grad_value_without_gradients_does_nothing():
    # torch 2.13's foreach clamp_ raises on the empty list (found in review).
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    assert fastclip.clip_grad_value_(params, 1.0) is None
    assert all(p.grad is None for p in params)
    assert all(p._version == 0 for p in params)


@pytest.mark.parametrize("ord", [2.0, math.inf], ids=ord_id)
def test_jagged_nested_gradients_normed_and_clipped_as_their_values(ord, fresh_warnings):
    # torch's vector_norm has no jagged kernel (found in review): fastclip
    # takes the nested gradient's values.
    parts = [torch.tensor([3.0, 4.0]), torch.tensor([12.0, 0.0, -1.0])]
    grad = torch.nested.nested_tensor([t.clone() for t in parts], layout=torch.jagged)
    plain = torch.tensor([2.0, -5.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_norm_close(fastclip.get_total_norm([grad, plain], ord), ref_norm(parts + [plain], ord))
        p, q = torch.nn.Parameter(grad.detach() * 0), torch.nn.Parameter(torch.zeros(2))
        p.grad, q.grad = grad, plain.clone()
        total = fastclip.clip_grad_norm_([p, q], 1.0, ord)
    coef = ref_coef(1.0, ref_norm(parts + [plain], ord)).item()
    assert_norm_close(total, ref_norm(parts + [plain], ord))
    for got, want in zip(p.grad.unbind(), parts):
        assert torch.allclose(got, want * coef, rtol=1e-6, atol=0.0)
    assert torch.allclose(q.grad, plain * coef, rtol=1e-6, atol=0.0)


_FORWARD_AD_CALLS = {
    "get_total_norm": lambda m, params, dual, kw: m.get_total_norm([p.grad for p in params], 2.0, **kw),
    "clip_grad_norm_": lambda m, params, dual, kw: m.clip_grad_norm_(params, 1.0, **kw),
    "clip_grad_value_": lambda m, params, dual, kw: m.clip_grad_value_(params, 3.5, **kw),
    "clip_grads_with_norm_": lambda m, params, dual, kw: m.clip_grads_with_norm_(
        params, 1.0, dual(torch.tensor(5.0), torch.tensor(1.0)), **kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("call", list(_FORWARD_AD_CALLS), ids=list(_FORWARD_AD_CALLS))
def test_forward_ad_tangents_like_torch(call, dtype):
    """Gradients with forward-mode AD tangents go to plain PyTorch, which
    propagates them as torch's foreach=False functions do (found in review:
    the kernels ignored them, and clip_grad_value_ left a clamped element's
    tangent). A gradient without one, in the same list, gets one from a
    coefficient that has one."""
    import torch.autograd.forward_ad as fwd

    def results(module, kw):
        with fwd.dual_level():
            params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (2, 3, 4)]
            params[0].grad = fwd.make_dual(torch.tensor([3.0, 4.0], dtype=dtype), torch.tensor([1.0, -2.0], dtype=dtype))
            params[1].grad = torch.tensor([1.0, 2.0, -5.0], dtype=dtype)
            params[2].grad = fwd.make_dual(torch.full((4,), 0.5, dtype=dtype), torch.ones(4, dtype=dtype))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = _FORWARD_AD_CALLS[call](module, params, fwd.make_dual, kw)
            duals = [fwd.unpack_dual(t) for t in ([out] if out is not None else []) + [p.grad for p in params]]
            return [(d.primal.clone(), None if d.tangent is None else d.tangent.clone()) for d in duals]

    ours, torchs = results(fastclip, {}), results(torch.nn.utils, {"foreach": False})
    assert len(ours) == len(torchs)
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2 ** -6, "atol": 0.0}  # 2 bf16 ulps
    for (primal, tangent), (primal_t, tangent_t) in zip(ours, torchs):
        # In float64: fastclip's norm of bf16 is float32, torch's bf16; the
        # coefficient comes from the float64 norm (the last bits differ).
        torch.testing.assert_close(primal.double(), primal_t.double(), **tol)
        assert (tangent is None) == (tangent_t is None)
        if tangent is not None:
            torch.testing.assert_close(tangent.double(), tangent_t.double(), **tol)


@pytest.mark.parametrize("ord", [0.5, 0.01, 3.5])
def test_forward_ad_tangent_with_a_zero_gradient_below_order_1(ord):
    """A zero gradient next to others: its powers' derivative at 0 (inf
    below order 1) made every tangent NaN (found in review); torch's
    vector_norm gives it none."""
    import torch.autograd.forward_ad as fwd

    def results(module, kw):
        with fwd.dual_level():
            params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
            params[0].grad = fwd.make_dual(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0]))
            params[1].grad = fwd.make_dual(torch.zeros(2), torch.zeros(2))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                total = module.clip_grad_norm_(params, 1.0, ord, **kw)
            return [fwd.unpack_dual(t).tangent.clone() for t in (total, params[0].grad, params[1].grad)]

    for ours, torchs in zip(results(fastclip, {}), results(torch.nn.utils, {"foreach": False})):
        assert bool(torch.isfinite(ours).all()), ours
        torch.testing.assert_close(ours.double(), torchs.double(), rtol=1e-5, atol=1e-7)


def test_forward_ad_total_norm_tangent_reaches_plain_gradients():
    """Only the given total_norm has a tangent (the one-call path otherwise):
    every gradient gets g * coef's tangent, as torch's mul_ gives it."""
    import torch.autograd.forward_ad as fwd

    def grads_after(module, kw):
        with fwd.dual_level():
            params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
            params[0].grad, params[1].grad = torch.tensor([1.0, 2.0, -2.0]), torch.tensor([4.0, 0.5])
            module.clip_grads_with_norm_(params, 2.0, fwd.make_dual(torch.tensor(5.0), torch.tensor(-3.0)), **kw)
            return [fwd.unpack_dual(p.grad) for p in params]

    for ours, torchs in zip(grads_after(fastclip, {}), grads_after(torch.nn.utils, {"foreach": False})):
        torch.testing.assert_close(ours.primal, torchs.primal, rtol=1e-6, atol=0.0)
        assert ours.tangent is not None
        torch.testing.assert_close(ours.tangent, torchs.tangent, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    "op, args, name",
    [
        ("multi_tensor_norm", lambda x: ([torch.ones(2), x], 2.0, False), r"tensors\[1\]"),
        ("clip_", lambda x: ([x], 1.0, 2.0, False), r"tensors\[0\]"),
        ("multi_tensor_clamp_", lambda x: ([torch.ones(3), x], 1.0), r"tensors\[1\]"),
        ("multi_tensor_scale_", lambda x: ([x], torch.tensor(0.5)), r"tensors\[0\]"),
        ("multi_tensor_scale_", lambda x: ([torch.ones(2)], x[0]), "coef"),
        ("clip_scalars_", lambda x: (x[0], 1.0, None, None, None, None, False, torch.zeros(()), torch.zeros(()),
                                     torch.zeros((), dtype=torch.int64), False), "norm"),
    ],
    ids=["norm", "clip", "clamp", "scale", "scale-coef", "clip-scalars"],
)
def test_ops_refuse_forward_ad_tangents(op, args, name):
    import torch.autograd.forward_ad as fwd

    with fwd.dual_level():
        x = fwd.make_dual(torch.tensor([30.0, 40.0]), torch.tensor([1.0, 0.0]))
        call_args = args(x)
        with pytest.raises(RuntimeError, match=f"fastclip::{op}: {name} carries a forward-mode AD tangent"):
            getattr(torch.ops.fastclip, op)(*call_args)
        assert torch.equal(fwd.unpack_dual(x).primal, torch.tensor([30.0, 40.0]))


@pytest.mark.parametrize("writer", list(_WRITERS), ids=list(_WRITERS))
def test_op_errors_name_the_parameter_not_the_op_list(writer):
    # The op sees only the gradients that are not None: its "tensors[1]" is
    # parameters[2] here, and the error says so.
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
    params[1].grad = torch.ones(4)
    params[2].grad = torch.full((1,), 7.0).expand(3)
    with pytest.raises(RuntimeError, match=r": parameters\[2\]\.grad has elements that share memory"):
        _WRITERS[writer](params)
    assert torch.equal(params[1].grad, torch.ones(4))


def test_non_leaf_grad_warning_is_a_python_warning():
    # Reading .grad of a non-leaf tensor makes torch warn (TORCH_WARN in
    # C++, where fastclip reads gradients): a Python warning, as for torch's
    # clip_grad_norm_, which filters can catch or turn into an error.
    leaf = torch.ones(3, requires_grad=True)
    non_leaf = leaf * 2.0
    non_leaf.sum().backward()
    leaf_param = torch.nn.Parameter(torch.zeros(2))
    leaf_param.grad = torch.full((2,), 4.0)
    with pytest.warns(UserWarning, match="not a leaf Tensor"):
        fastclip.clip_grad_norm_([leaf_param, non_leaf], 1.0)
    torch.testing.assert_close(leaf_param.grad, torch.full((2,), 1.0 / math.sqrt(2.0)), rtol=1e-6, atol=0)
    before = leaf_param.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="not a leaf Tensor"):
            fastclip.clip_grad_norm_([leaf_param, non_leaf], 0.1)
    assert_identical(leaf_param.grad, before)


def test_non_leaf_grad_that_is_retained_is_clipped_without_warning():
    # The C++ gather reads a defined gradient without torch's leaf check
    # (which only warns about an undefined one): a retained gradient of a
    # non-leaf tensor is clipped, with no warning, as torch does.
    leaf = torch.ones(3, requires_grad=True)
    non_leaf = leaf * 2.0
    non_leaf.retain_grad()
    (non_leaf * 3.0).sum().backward()
    torch_leaf = torch.ones(3, requires_grad=True)
    torch_non_leaf = torch_leaf * 2.0
    torch_non_leaf.retain_grad()
    (torch_non_leaf * 3.0).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = fastclip.clip_grad_norm_([non_leaf, leaf], 1.0)
        expected = torch.nn.utils.clip_grad_norm_([torch_non_leaf, torch_leaf], 1.0)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(non_leaf.grad, torch_non_leaf.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(leaf.grad, torch_leaf.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "split-path"])
def test_error_if_nonfinite_decides_on_the_float64_norm(split, fresh_warnings):
    # Gradients whose norm (4.2e38) is finite but beyond float32's range:
    # clipped, the norm returned as inf, and no error, whether the list goes
    # to the fused op (fp32) or through the split path (complex64, norms in
    # float64 by the fallback), which decided on the float32 norm and
    # raised. (A kernel part's norm on the split path is the op's float32
    # one: see test_split_path_fp64_beyond_float32_range.)
    if split:
        grads = [torch.full((2,), 3e38 + 0j, dtype=torch.complex64), torch.ones(3)]
    else:
        grads = [torch.full((2,), 3e38)]
    params = make_params(grads)
    norm = ref_norm(grads)
    assert torch.isfinite(norm) and norm > torch.finfo(torch.float32).max
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's once-only notice
        total = fastclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert torch.isinf(total)
    # The coefficient (2.4e-39) is below float32's normal range: float64
    # products rounded once, as the kernels and the fallback make them.
    coef = ref_coef(1.0, norm)
    for p, g in zip(params, grads):
        assert_identical(p.grad, ref_scaled(g, coef).to(g.dtype))


@pytest.mark.parametrize("flag", [1, "yes", torch.tensor(True), 0, ""])
def test_error_if_nonfinite_is_read_as_truth_value(flag):
    params = _params(seed=8, with_none=False)
    reference = clone_params(params)
    total = fastclip.clip_grad_norm_(params, 0.5, error_if_nonfinite=flag)
    expected = fastclip.clip_grad_norm_(reference, 0.5, error_if_nonfinite=bool(flag))
    assert_same_bits(total, expected)
    params[0].grad[0] = math.nan
    if flag:
        with pytest.raises(RuntimeError, match="non-finite"):
            fastclip.clip_grad_norm_(params, 0.5, error_if_nonfinite=flag)
    else:
        assert math.isnan(fastclip.clip_grad_norm_(params, 0.5, error_if_nonfinite=flag).item())


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "grad_norms", "clip_grad_value_", "clip_grads_with_norm_"])
def test_params_without_grad_are_skipped(fn):
    with_none = _params(seed=9)
    without = [clone_params([p])[0] for p in with_none if p.grad is not None]
    call = {
        "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 0.5),
        "grad_norms": lambda ps: fastclip.grad_norms(ps)[0],
        "clip_grad_value_": lambda ps: fastclip.clip_grad_value_(ps, 0.2),
        "clip_grads_with_norm_": lambda ps: fastclip.clip_grads_with_norm_(ps, 0.5, torch.tensor(4.0)),
    }[fn]
    a, b = call(with_none), call(without)
    if a is not None:
        assert_same_bits(a, b)
    assert with_none[2].grad is None
    for p, q in zip([p for p in with_none if p.grad is not None], without):
        assert_same_bits(p.grad, q.grad)


@pytest.mark.parametrize("foreach", [True, False, None])
def test_foreach_is_accepted(foreach):
    params, reference = _params(seed=10), _params(seed=10)
    assert_same_bits(
        fastclip.clip_grad_norm_(params, 0.5, foreach=foreach), fastclip.clip_grad_norm_(reference, 0.5)
    )
    assert_same_bits(
        fastclip.get_total_norm(_grads(params), foreach=foreach), fastclip.get_total_norm(_grads(reference))
    )
    fastclip.clip_grads_with_norm_(params, 0.1, torch.tensor(3.0), foreach=foreach)
    fastclip.clip_grads_with_norm_(reference, 0.1, torch.tensor(3.0))
    fastclip.clip_grad_value_(params, 0.01, foreach=foreach)
    fastclip.clip_grad_value_(reference, 0.01)
    for p, q in zip(_grads(params), _grads(reference)):
        assert_same_bits(p, q)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_norm_is_float32_0dim_for_every_dtype(dtype):
    params = _params(dtype, seed=11)
    for total in (
        fastclip.get_total_norm(_grads(params)),
        fastclip.grad_norms(params)[0],
        fastclip.clip_grad_norm_(params, 1.0),
    ):
        assert total.dtype == torch.float32 and total.shape == () and total.device.type == "cpu"


def test_empty_inputs_like_torch():
    for got, expected in [
        (fastclip.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0)),
        (fastclip.get_total_norm([]), torch.nn.utils.get_total_norm([])),
        (fastclip.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0), torch.tensor(0.0)),
    ]:
        assert_same_bits(got, expected)
    total, each = fastclip.grad_norms([])
    assert_same_bits(total, torch.tensor(0.0))
    assert each.shape == (0,)
    total, each = fastclip.grad_norms([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))])
    assert_same_bits(each, torch.zeros(2))
    assert fastclip.clip_grad_value_([], 1.0) is None
    assert fastclip.clip_grads_with_norm_([], 1.0, torch.tensor(2.0)) is None


def test_empty_inputs_under_a_float64_default_dtype():
    # torch's empty-list norm takes the default dtype, and so does fastclip's
    # drop-in; grad_norms, fastclip's own, is float32 as documented (it took
    # the default dtype; found in review).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert_same_bits(fastclip.get_total_norm([]), torch.nn.utils.get_total_norm([]))
        assert_same_bits(fastclip.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
        for params in ([], [torch.nn.Parameter(torch.ones(3))]):
            total, each = fastclip.grad_norms(params)
            assert total.dtype == each.dtype == torch.float32 and each.shape == (len(params),)
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------- grad_norms
@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grad_norms(dtype, ord):
    params = _params(dtype, seed=12, shapes=_shapes_for(ord))
    before = snapshot(_grads(params))
    total, each = fastclip.grad_norms((p for p in params), ord)

    assert_same_bits(total, fastclip.get_total_norm(_grads(params), ord))
    assert each.dtype == torch.float32 and each.shape == (len(params),)
    assert each[2].item() == 0.0 and params[2].grad is None
    if dtype in ACCURATE:
        expected = [0.0 if p.grad is None else torch.linalg.vector_norm(p.grad, ord).item() for p in params]
        torch.testing.assert_close(each.double(), torch.tensor(expected, dtype=torch.float64), rtol=TORCH_RTOL, atol=0)
    present = [i for i, p in enumerate(params) if p.grad is not None]
    assert_norm_close(each[present], ref_norms_each(_grads(params), ord), dtype)
    assert_untouched(_grads(params), before)


# ------------------------------------------------------------- overflow
def test_fp32_1e30_norm_is_finite_and_clips_correctly():
    grads = filled([(10,), (3, 4), (7,), ()], 1e30, torch.float32)
    params, torch_params = make_params(grads), make_params(grads)
    norm = ref_norm(grads)

    total = fastclip.clip_grad_norm_(params, 1.0)

    assert torch.isfinite(total)
    assert_norm_close(total, norm)
    after = _grads(params)
    assert torch.isfinite(torch.cat([g.flatten() for g in after])).all()
    torch.testing.assert_close(ref_norm(after).item(), 1.0, rtol=1e-5, atol=0)
    _assert_grads_scaled(params, grads, ref_coef(1.0, norm))

    # What torch does with the same gradients: the fp32 sum of squares
    # overflows, the norm is inf and every gradient is multiplied by 0.
    assert torch.isinf(torch.nn.utils.clip_grad_norm_(torch_params, 1.0))
    assert all((p.grad == 0).all() for p in torch_params)


def test_fp16_norm_above_65504():
    grads = [torch.full((100,), 60000.0, dtype=torch.float16)]
    params = make_params(grads)
    assert fastclip.get_total_norm(grads).item() == 600000.0
    assert torch.isinf(torch.nn.utils.get_total_norm(grads))  # torch: an fp16 norm
    total = fastclip.clip_grad_norm_(params, 3.0)
    assert total.item() == 600000.0
    _assert_grads_scaled(params, grads, ref_coef(3.0, torch.tensor(600000.0, dtype=torch.float64)))


@pytest.mark.parametrize("ord", [2.0, 1.0, 3.5], ids=ord_id)
def test_fp64_beyond_float32_range_clips_to_max_norm(ord):
    grads = filled([(10,), (3, 4), (5,)], 1e200, torch.float64)
    params = make_params(grads)
    norm = ref_norm(grads, ord)
    assert math.isfinite(norm.item())

    total = fastclip.clip_grad_norm_(params, 2.0, ord)

    assert total.dtype == torch.float32 and torch.isinf(total)  # 1e200 has no float32
    after = _grads(params)
    assert all(torch.isfinite(g).all() for g in after)
    torch.testing.assert_close(ref_norm(after, ord).item(), 2.0, rtol=1e-12, atol=0)
    _assert_grads_scaled(params, grads, ref_coef(2.0, norm))


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
def test_fp64_underflow_gives_zero_not_nan(ord):
    grads = filled([(10,), (3, 4), ()], 1e-200, torch.float64)
    params = make_params(grads)
    before = snapshot(_grads(params))
    total, each = fastclip.grad_norms(params, ord)
    assert total.item() == 0.0 and (each == 0).all()  # the true values underflow float32
    assert fastclip.get_total_norm(grads, ord).item() == 0.0
    assert fastclip.clip_grad_norm_(params, 1.0, ord).item() == 0.0
    assert_untouched(_grads(params), before)  # coefficient 1


def _check_finite_norms_and_clip(grads, ord):
    """Total and per-tensor norms against float64 through every entry point,
    then a clip to half the norm."""
    params = make_params(grads)
    norm = ref_norm(grads, ord)
    assert 0.0 < norm.item() < math.inf

    assert_norm_close(fastclip.get_total_norm(grads, ord), norm)
    total, each = fastclip.grad_norms(params, ord)
    assert_norm_close(total, norm)
    assert_norm_close(each, ref_norms_each(grads, ord))
    max_norm = 0.5 * norm.item()
    assert_norm_close(fastclip.clip_grad_norm_(params, max_norm, ord), norm)
    _assert_grads_scaled(params, grads, ref_coef(max_norm, norm))


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
@pytest.mark.parametrize("ord", [3.5, 12.0], ids=ord_id)
def test_general_order_fp32_extremes(ord, magnitude):
    # |x|**12 of 1e30 overflows and of 1e-30 underflows a double: the
    # scaled recomputation (the rescue) must kick in; 3.5 stays in range.
    grads = filled([(10,), (3, 4), (7,)], magnitude, torch.float32)
    grads[1][0, 0] *= 3.0
    _check_finite_norms_and_clip(grads, ord)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("ord", [1023.0, 1100.0, 1500.0, 1e4, 1e300], ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_orders_above_1022(dtype, ord, device):
    # |x|**p underflows a double for |x| < 2**(-1074 / p): below 0.61 at
    # p = 1500, even after scaling the largest |x| into [0.5, 1) by a power
    # of two. Three magnitudes in three tensors: the largest term must be
    # kept exactly, the others combined at their own scales.
    grads = make_grads([(300,), (7, 11), (5,)], dtype, device, seed=31, scale=0.25)  # |x| < 1
    grads[1].mul_(1e-3)
    grads[2].mul_(0.5)
    _check_finite_norms_and_clip(grads, ord)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize(
    "values, ord",
    [([5e-324, 3.0], 0.01), ([1e-300] * 1585, 0.01), ([1e-300] * 1585 + [2.0], 0.5), ([1e300] * 40, 0.999)],
    ids=["subnormal-next-to-3", "root-beyond-range", "mixed", "huge"],
)
def test_small_orders_fp64_extremes(values, ord, device):
    # p < 1: a tiny value next to a large one still counts
    # ((5e-324 / 3)**0.01 = 6e-4), and sum**(1/p) of tiny values overflows a
    # double although the norm (1e20) does not.
    grads = [torch.tensor(values, dtype=torch.float64, device=device)]
    norm = ref_norm(grads, ord)
    assert 0.0 < norm.item() < math.inf
    total, each = fastclip.grad_norms(make_params(grads), ord)
    if norm.item() < 3e38:
        assert_norm_close(total, norm)
        assert_norm_close(each, ref_norms_each(grads, ord))
    else:  # beyond float32: the total is inf, the clip still right
        assert torch.isinf(total)
    params = make_params(grads)
    fastclip.clip_grad_norm_(params, 0.5, ord)
    _assert_grads_scaled(params, grads, ref_coef(0.5, norm))


_WORKER_DAZ_SCRIPT = """
import torch, fastclip
torch.set_num_threads(2)
torch.set_flush_denormal(True)
torch.ones(2**22).sum()  # the intra-op worker thread starts with denormals flushed
torch.set_flush_denormal(False)  # only for this thread
tiny = torch.full((2**18,), 1e-310, dtype=torch.float64)  # subnormal: rescued
ones = torch.ones(2**18, dtype=torch.float64)
for p in (1.0, 2.0, 3.0):
    print(fastclip.get_total_norm([tiny, ones], p).item(), fastclip.get_total_norm([tiny], p).item())
"""


def test_rescue_of_subnormal_fp64_with_a_flushing_worker_thread():
    # torch.set_flush_denormal changes the calling thread only, so worker
    # threads can read subnormals as 0 while the main thread does not. The
    # rescue pass divides by a scale: a subnormal scale read as 0 made the
    # norm of finite data NaN. A fresh process, so the pool starts flushed.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WORKER_DAZ_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [[float(v) for v in line.split()] for line in out.stdout.split("\n") if line.strip()]
    expected = [2.0**18, 2.0**9, 2.0**6]  # the ones alone; 1e-310 is 0 in float32
    assert [r[0] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert [r[1] for r in rows] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("ord", [1500.0, 3.5], ids=ord_id)
def test_large_order_nonfinite_and_zero(ord, device):
    # The scaled sums must keep torch's non-finite results: inf data gives
    # inf, NaN gives NaN, and an all-zero list gives 0 (no 0 / 0).
    def norm_of(values):
        return fastclip.get_total_norm([torch.tensor(values, device=device)], ord).item()

    assert norm_of([0.5, math.inf, 0.25]) == math.inf
    assert math.isnan(norm_of([0.5, math.nan, 2.0]))
    assert norm_of([0.0, 0.0]) == 0.0
    assert norm_of([0.0, 0.75, 0.0]) == 0.75


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("ord", [1e-7, 1e-10, 1e-17, 5e-324], ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_tiny_orders(dtype, ord, device):
    # |x|**p rounds to 1 + p ln|x| there, and the root raises that rounding
    # error to the power 1/p (found in review: the norm of a single 4 was 1
    # at p = 1e-17, 3.9999957 at 1e-10; torch gives 4). One non-zero value
    # is its own norm; two have an infinite one.
    one = torch.zeros(5, dtype=dtype, device=device)
    one[3] = -3.0
    zeros = torch.zeros(4, dtype=dtype, device=device)
    two = torch.tensor([3.0, 0.0, 0.5], dtype=dtype, device=device)
    total, each = fastclip.grad_norms(make_params([one, zeros]), ord)
    assert total.item() == 3.0 and each.tolist() == [3.0, 0.0]
    total, each = torch.ops.fastclip.multi_tensor_norm([zeros, one], ord, True, True)  # float64 results
    assert total.item() == 3.0 and each.tolist() == [0.0, 3.0]
    total, each = fastclip.grad_norms(make_params([one, two]), ord)
    assert total.item() == math.inf and each.tolist() == [3.0, math.inf]
    params = make_params([one, zeros])
    assert fastclip.clip_grad_norm_(params, 1.5, ord).item() == 3.0
    _assert_grads_scaled(params, [one, zeros], ref_coef(1.5, torch.tensor(3.0)))
    # The plain-PyTorch path (no extension, complex or float8 gradients)
    # alike, also for a value below 1, whose |x|**p rounds up (found in
    # review: 0.25 came out as 1.0 at p = 1e-17).
    quarter = torch.tensor([0.0, -0.25, 0.0], dtype=dtype, device=device)
    for values in ([one, zeros], [quarter]):
        total, each = _fallback.multi_tensor_norm(values, ord, True, fp64=True)
        assert total.item() == max(v.abs().max().item() for v in values)
        assert each.tolist() == [v.abs().max().item() for v in values]


# -------------------------------------------------------- non-finite
NONFINITE = {
    "nan": [(0, 3, math.nan)],
    "inf": [(1, 2, math.inf)],
    "-inf": [(0, 0, -math.inf)],
    "nan_and_inf": [(0, 1, math.nan), (5, 4, math.inf)],
    # Inside whole vector blocks of the last gradient (123 elements), not a tail.
    "nan_in_block": [(-1, 40, math.nan)],
    "inf_in_block": [(-1, 70, -math.inf)],
}


def _nonfinite_params(kind, ord, dtype=torch.float32):
    params = _params(dtype, seed=13, shapes=_shapes_for(ord))
    for param_index, flat_index, value in NONFINITE[kind]:
        params[param_index].grad.view(-1)[flat_index] = value
    return params


def _same_nonfinite(actual, expected):
    """Both NaN, or the same infinity (fastclip's norm is float32, torch's of the gradients' dtype)."""
    assert actual.isnan() == expected.isnan() and actual.isinf() == expected.isinf(), (actual, expected)
    assert actual.isnan() or actual.item() == expected.item(), (actual, expected)


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("kind", list(NONFINITE))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nonfinite_propagates_like_torch(dtype, kind, ord):
    params = _nonfinite_params(kind, ord, dtype)
    torch_params = clone_params(params)
    grads = [g.clone() for g in _grads(params)]

    total = fastclip.clip_grad_norm_(params, 1.0, ord)
    expected = torch.nn.utils.clip_grad_norm_(torch_params, 1.0, ord)

    _same_nonfinite(total, expected)
    ours, theirs = fastclip.get_total_norm(grads, ord), torch.nn.utils.get_total_norm(grads, ord)
    if dtype == torch.float32:
        assert_identical(ours, theirs)
    else:  # fastclip's norm is float32 for every dtype
        _same_nonfinite(ours, theirs)
    for p, q in zip(params, torch_params):
        if q.grad is None:
            continue
        assert torch.equal(torch.isnan(p.grad), torch.isnan(q.grad))
        assert torch.equal(torch.isinf(p.grad), torch.isinf(q.grad))
        torch.testing.assert_close(p.grad, q.grad, rtol=TORCH_RTOL, atol=0, equal_nan=True)


def _torch_message(fn, *args, **kwargs):
    with pytest.raises(RuntimeError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("ord", [2, 2.0, math.inf, 1, 3.5], ids=lambda o: f"ord={o!r}")
@pytest.mark.parametrize("kind", list(NONFINITE))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_error_if_nonfinite_raises_torch_error_and_modifies_nothing(dtype, kind, ord):
    params = _nonfinite_params(kind, ord, dtype)
    torch_params = clone_params(params)
    before = snapshot(_grads(params))
    expected = _torch_message(torch.nn.utils.clip_grad_norm_, torch_params, 1.0, ord, error_if_nonfinite=True)
    assert "The total norm of order" in expected

    assert _torch_message(fastclip.clip_grad_norm_, params, 1.0, ord, error_if_nonfinite=True) == expected
    assert _torch_message(fastclip.get_total_norm, _grads(params), ord, error_if_nonfinite=True) == _torch_message(
        torch.nn.utils.get_total_norm, _grads(torch_params), ord, error_if_nonfinite=True
    )
    assert_untouched(_grads(params), before)


def test_nonfinite_error_writes_the_order_as_python_does():
    # The fused op builds torch's message in C++; the order as f"{norm_type}"
    # (found in review: 1e16 + 2 came out without its exponent).
    orders = [0.1, 1e-5, 3.5, 7.0, 123456789.5, 1e15, 1e16, 1e16 + 2, 2.0**60, 1e300, 0.30000000000000004]
    for ord in orders:
        with pytest.raises(RuntimeError) as info:
            fastclip.clip_grad_norm_(make_params([torch.tensor([math.inf])]), 1.0, ord, error_if_nonfinite=True)
        assert f"The total norm of order {ord} for gradients" in str(info.value), ord


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_error_if_nonfinite_true_clips_like_false(dtype, ord):
    params, plain = _params(dtype, seed=14), _params(dtype, seed=14)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    norm = ref_norm(_grads(params), ord)
    max_norm = 0.3 * norm.item()
    checked = fastclip.clip_grad_norm_(params, max_norm, ord, error_if_nonfinite=True)
    assert_same_bits(checked, fastclip.clip_grad_norm_(plain, max_norm, ord))
    assert_norm_close(checked, norm, dtype)
    _assert_grads_scaled(params, before, ref_coef(max_norm, norm))


def test_error_if_nonfinite_fp64_norm_beyond_float32():
    # The norm of these fp64 gradients (~3.6e100) is finite but has no
    # float32 value. torch's fp64 norm is finite, so torch clips without an
    # error; a drop-in must not raise either.
    grads = filled([(10,), (3, 4)], 1e100, torch.float64)
    params, torch_params = make_params(grads), make_params(grads)
    norm = ref_norm(grads)
    assert torch.isfinite(torch.nn.utils.clip_grad_norm_(torch_params, 2.0, error_if_nonfinite=True))
    fastclip.clip_grad_norm_(params, 2.0, error_if_nonfinite=True)
    _assert_grads_scaled(params, grads, ref_coef(2.0, norm))


def test_inf_norm_with_empty_tensor():
    grads = make_grads([(7,), (0,), (3, 0)], seed=22)
    with pytest.raises(RuntimeError, match="identity"):
        torch.nn.utils.get_total_norm(grads, math.inf)  # torch: no max of nothing
    assert_norm_close(fastclip.get_total_norm(grads, math.inf), ref_norm(grads, math.inf))
    total, each = fastclip.grad_norms(make_params(grads), math.inf)
    assert_norm_close(each, ref_norms_each(grads, math.inf))


# ------------------------------------------------------------ bad input
def _p():
    return _params(seed=15)


def _with_norm(ps, max_norm):
    return fastclip.clip_grads_with_norm_(ps, max_norm, torch.tensor(5.0))


PARAMS_1 = r"parameters\[1\]"
BAD_INPUTS = [
    ("max_norm=-1", lambda ps: fastclip.clip_grad_norm_(ps, -1.0), ValueError, "max_norm"),
    ("max_norm=nan", lambda ps: fastclip.clip_grad_norm_(ps, math.nan), ValueError, "max_norm"),
    ("max_norm=inf", lambda ps: fastclip.clip_grad_norm_(ps, math.inf), ValueError, "max_norm"),
    ("with_norm max_norm=-1", lambda ps: _with_norm(ps, -1.0), ValueError, "max_norm"),
    ("with_norm max_norm=nan", lambda ps: _with_norm(ps, math.nan), ValueError, "max_norm"),
    ("with_norm max_norm=inf", lambda ps: _with_norm(ps, math.inf), ValueError, "max_norm"),
]
# None and complex numbers are no real number at all: TypeError, as torch's float() raises.
for _bad, _error in [(0, ValueError), (0.0, ValueError), (-1, ValueError), (-math.inf, ValueError),
                     (math.nan, ValueError), ("abc", ValueError), (None, TypeError), (2 + 1j, TypeError)]:
    BAD_INPUTS += [
        (f"clip norm_type={_bad!r}", lambda ps, b=_bad: fastclip.clip_grad_norm_(ps, 1.0, b), _error, "norm_type"),
        (f"total norm_type={_bad!r}", lambda ps, b=_bad: fastclip.get_total_norm(_grads(ps), b), _error,
         "norm_type"),
        (f"grad_norms norm_type={_bad!r}", lambda ps, b=_bad: fastclip.grad_norms(ps, b), _error, "norm_type"),
    ]
BAD_INPUTS += [
    ("max_norm=None", lambda ps: fastclip.clip_grad_norm_(ps, None), TypeError, "max_norm"),
    ("clip_value=None", lambda ps: fastclip.clip_grad_value_(ps, None), TypeError, "clip_value"),
    ("with_norm total_norm=None", lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, None), TypeError, "total_norm"),
    ("with_norm total_norm complex", lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, torch.tensor(5.0 + 1j)),
     TypeError, "total_norm"),
    ("with_norm total_norm of 2", lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, torch.ones(2)), ValueError,
     "total_norm"),
    # A string is no number even where float() parses it (found in review; torch raises TypeError too).
    ("with_norm total_norm='10'", lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, "10"), TypeError, "total_norm"),
    ("with_norm total_norm=b'10'", lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, b"10"), TypeError,
     "total_norm"),
]
# An int beyond the double range: OverflowError, as torch's float() raises, but naming the argument.
HUGE_INT = 10**400
BAD_INPUTS += [
    ("max_norm=10**400", lambda ps: fastclip.clip_grad_norm_(ps, HUGE_INT), OverflowError, "max_norm"),
    ("norm_type=10**400", lambda ps: fastclip.clip_grad_norm_(ps, 1.0, HUGE_INT), OverflowError, "norm_type"),
    ("clip_value=10**400", lambda ps: fastclip.clip_grad_value_(ps, HUGE_INT), OverflowError, "clip_value"),
    ("with_norm total_norm=10**400", lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, HUGE_INT), OverflowError,
     "total_norm"),
]
BAD_INPUTS += [
    ("clip_value=-1", lambda ps: fastclip.clip_grad_value_(ps, -1.0), ValueError, "clip_value"),
    ("clip_value=nan", lambda ps: fastclip.clip_grad_value_(ps, math.nan), ValueError, "clip_value"),
    ("clip_value=abc", lambda ps: fastclip.clip_grad_value_(ps, "abc"), ValueError, "clip_value"),
    ("clip [p, 3]", lambda ps: fastclip.clip_grad_norm_([ps[0], 3], 1.0), TypeError, PARAMS_1),
    ("with_norm [p, 3]", lambda ps: _with_norm([ps[0], 3], 1.0), TypeError, PARAMS_1),
    ("value [p, 3]", lambda ps: fastclip.clip_grad_value_([ps[0], 3], 1.0), TypeError, PARAMS_1),
    ("grad_norms [p, 3]", lambda ps: fastclip.grad_norms([ps[0], 3]), TypeError, PARAMS_1),
    ("clip [p, p, 'x', p]", lambda ps: fastclip.clip_grad_norm_(ps[:2] + ["x"] + ps[3:4], 1.0), TypeError,
     r"parameters\[2\]"),
    ("total [t, 'x']", lambda ps: fastclip.get_total_norm([ps[0].grad, "x"]), TypeError, r"tensors\[1\]"),
    ("total [t, t, 1.5]", lambda ps: fastclip.get_total_norm(_grads(ps)[:2] + [1.5]), TypeError, r"tensors\[2\]"),
]


@pytest.mark.parametrize("call, error, match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument_and_modifies_nothing(call, error, match):
    params = _p()
    before = snapshot(_grads(params))
    with pytest.raises(error, match=match):
        call(params)
    assert_untouched(_grads(params), before)


# ------------------------------------------------------- coefficient 1
@pytest.mark.parametrize("how", ["clip_grad_norm_", "clip_grad_norm_ checked", "clip_grads_with_norm_"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_coefficient_one_writes_nothing(dtype, how):
    params = _params(dtype, seed=16)
    before = snapshot(_grads(params))
    norm = fastclip.get_total_norm(_grads(params))
    if how == "clip_grad_norm_":
        total = fastclip.clip_grad_norm_(params, 2 * norm.item())
    elif how == "clip_grad_norm_ checked":
        total = fastclip.clip_grad_norm_(params, 2 * norm.item(), error_if_nonfinite=True)
    else:
        total = norm
        fastclip.clip_grads_with_norm_(params, 2 * norm.item(), norm)
    assert_same_bits(total, norm)
    assert_untouched(_grads(params), before)  # values and _version


@pytest.mark.parametrize("nonfinite", [None, math.inf], ids=["finite", "inf"])
@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_max_norm_zero_zeroes_like_torch(dtype, ord, nonfinite):
    # max_norm = 0: a coefficient of 0, every gradient +-0 with its sign, as
    # torch; an inf gradient makes the norm inf, the coefficient 0 and
    # inf * 0 NaN (found in review: only hypothesis ever tried 0).
    params = _params(dtype, seed=21, shapes=_shapes_for(ord))
    if nonfinite is not None:
        params[-1].grad[7] = nonfinite
    torch_params = clone_params(params)
    norm = ref_norm(_grads(params), ord)
    total = fastclip.clip_grad_norm_(params, 0.0, ord)
    expected = torch.nn.utils.clip_grad_norm_(torch_params, 0.0, ord)
    if nonfinite is None:
        assert_norm_close(total, norm, dtype)
    else:
        assert total.item() == expected.item() == math.inf
    for g, h in zip(_grads(params), _grads(torch_params)):
        assert_identical(g, h)
        assert (g == 0).sum() + g.isnan().sum() == g.numel()


@pytest.mark.parametrize("total_norm", [0.5, 100.0], ids=["coef_one", "clips"])
def test_gradient_mul_cannot_write_is_refused_whatever_the_coefficient(total_norm):
    # A float8 gradient, which torch's mul_ cannot write: refused before
    # anything is written, also when the coefficient is exactly 1 (found in
    # review: the skip at 1 came before the check, so a job would fail only
    # once clipping set in).
    grads = [torch.randn(5), torch.randn(4).to(torch.float8_e4m3fn)]
    params = make_params(grads)
    before = snapshot(_grads(params))
    with pytest.raises(TypeError, match="which torch's mul_ cannot write"):
        fastclip.clip_grads_with_norm_(params, 1.0, total_norm)
    assert_untouched(_grads(params), before)


@pytest.mark.parametrize("how", ["clip_grad_norm_", "clip_grad_norm_ checked", "clip_grads_with_norm_"])
def test_coefficient_one_writes_nothing_on_the_split_path(how):
    # A complex gradient sends the list through the split path (kernels and
    # plain PyTorch); the fallback's mul_ wrote every gradient there, the
    # complex one twice (found in review).
    grads = make_grads([(17,), (4, 9)], [torch.float32, torch.bfloat16], seed=19)
    grads.insert(1, torch.complex(*make_grads([(5, 2), (5, 2)], torch.float32, seed=20)))
    params = make_params(grads)
    before = snapshot(_grads(params))
    norm = fastclip.get_total_norm(_grads(params))
    if how == "clip_grad_norm_":
        fastclip.clip_grad_norm_(params, 2 * norm.item())
    elif how == "clip_grad_norm_ checked":
        fastclip.clip_grad_norm_(params, 2 * norm.item(), error_if_nonfinite=True)
    else:
        fastclip.clip_grads_with_norm_(params, 2 * norm.item(), norm)
    assert_untouched(_grads(params), before)  # values and _version


# --------------------------------------------------------- split path
def _sparse(dtype, coalesced):
    indices = torch.tensor([[0, 2, 2, 5], [1, 0, 0, 3]]) if not coalesced else torch.tensor([[0, 2, 5], [1, 0, 3]])
    values = torch.tensor([1.5, -2.0, 0.75, 3.0] if not coalesced else [1.5, -1.25, 3.0], dtype=dtype)
    t = torch.sparse_coo_tensor(indices, values, (6, 4), check_invariants=True)
    return t.coalesce() if coalesced else t


def _mixed_grads(coalesced=False):
    dense = make_grads([(17,), (4, 9)], [torch.float32, torch.bfloat16], seed=17)
    complex_grad = torch.complex(*make_grads([(5, 2), (5, 2)], torch.float32, seed=18))
    return [dense[0], _sparse(torch.float32, coalesced), dense[1], complex_grad]


SPLIT_PATH_RTOL = 2.0**-22


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
def test_split_path_sparse_and_complex(ord, fresh_warnings):
    grads = _mixed_grads()
    params = make_params(grads)
    params.insert(1, torch.nn.Parameter(torch.zeros(2)))  # no gradient
    norm = ref_norm(grads, ord)
    max_norm = 0.3 * norm.item()

    with pytest.warns(UserWarning, match="fastclip"):
        assert_norm_close(fastclip.get_total_norm(grads, ord), norm)
    total, each = fastclip.grad_norms(params, ord)
    assert_norm_close(total, norm)
    assert each[1].item() == 0.0
    assert_norm_close(each[[0, 2, 3, 4]], ref_norms_each(grads, ord))

    total = fastclip.clip_grad_norm_(params, max_norm, ord)

    assert_norm_close(total, norm)
    coef = ref_coef(max_norm, norm)
    for after, g in zip(_grads(params), grads):
        assert after.layout == g.layout
        # The split path combines the kernels' float32 norm of their part, so
        # its coefficient is exact to float32 rounding only: 2 float32 ulps.
        assert_scaled_close(after, ref_scaled(g, coef), rtol=SPLIT_PATH_RTOL)


@pytest.mark.parametrize("coalesced", [False, True], ids=["uncoalesced", "coalesced"])
def test_split_path_sparse_against_torch(coalesced, fresh_warnings):
    # Why the references here densify: torch's own clip fails on a sparse
    # gradient before torch 2.14 (2.6-2.13 checked). From 2.14 it computes
    # it (coalescing first), and fastclip must give its results.
    if fastclip._torch_release(torch.__version__) < (2, 14):
        with pytest.raises(RuntimeError, match="linalg_vector_norm.*Sparse"):
            torch.nn.utils.clip_grad_norm_(make_params([_sparse(torch.float32, coalesced)]), 1.0)
        return
    for ord in ORDS:
        ours, theirs = make_params([_sparse(torch.float32, coalesced)]), make_params([_sparse(torch.float32, coalesced)])
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, ord)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="fastclip", category=UserWarning)
            total = fastclip.clip_grad_norm_(ours, 1.0, ord)
        torch.testing.assert_close(total, expected, rtol=TORCH_RTOL, atol=0.0)
        assert ours[0].grad.is_sparse
        torch.testing.assert_close(ours[0].grad.to_dense(), theirs[0].grad.to_dense(), rtol=TORCH_RTOL, atol=0.0)


def test_split_path_error_if_nonfinite(fresh_warnings):
    grads = _mixed_grads()
    grads[0][4] = math.inf
    params = make_params(grads)
    before = snapshot(_grads(params))
    with pytest.warns(UserWarning, match="fastclip"), pytest.raises(RuntimeError, match="non-finite"):
        fastclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert_untouched(_grads(params), before)


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
def test_split_path_sparse_grad_without_entries(ord, fresh_warnings):
    empty_sparse = torch.sparse_coo_tensor(
        torch.zeros((1, 0), dtype=torch.long), torch.zeros(0), (5,), check_invariants=True
    )
    grads = [make_grads([(9,)], seed=23)[0], empty_sparse]
    params = make_params(grads)
    check_norm_paths(fastclip, grads, params, ord)


def test_split_path_clip_grad_value_sparse(fresh_warnings):
    grads = [make_grads([(9,)], seed=19, scale=3.0)[0], _sparse(torch.float32, coalesced=True)]
    params = make_params(grads)
    with pytest.warns(UserWarning, match="fastclip"):
        fastclip.clip_grad_value_(params, 1.0)
    assert_identical(params[0].grad, torch.clamp(grads[0], -1.0, 1.0))
    assert params[1].grad.layout == torch.sparse_coo
    assert_identical(params[1].grad.to_dense(), torch.clamp(grads[1].to_dense(), -1.0, 1.0))


# The offending gradient is that of parameters[2], the second gradient that
# is not None: either name identifies it.
_SECOND_GRAD = r"(parameters\[2\]\.grad|gradient 1 )"


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda: _sparse(torch.float32, coalesced=False), ValueError, _SECOND_GRAD + ".*uncoalesced"),
        (lambda: torch.complex(torch.ones(3), torch.ones(3)), TypeError, _SECOND_GRAD + ".*complex"),
    ],
    ids=["uncoalesced", "complex"],
)
def test_split_path_clip_grad_value_refuses_before_writing(bad, error, match, fresh_warnings):
    grads = [make_grads([(9,)], seed=20, scale=3.0)[0], None, bad()]
    params = make_params(grads)
    before = snapshot(_grads(params))
    with pytest.warns(UserWarning, match="fastclip"), pytest.raises(error, match=match):
        fastclip.clip_grad_value_(params, 1.0)
    assert_untouched(_grads(params), before)


def test_split_path_fp64_beyond_float32_range(fresh_warnings):
    # The same contract as test_fp64_beyond_float32_range_clips_to_max_norm
    # when a sparse gradient sends the list through the split path: each
    # part's norm is combined in float64 (the kernel part's was float32, inf).
    grads = filled([(10,), (3, 4)], 1e200, torch.float64) + [_sparse(torch.float64, coalesced=True)]
    params = make_params(grads)
    norm = ref_norm(grads)
    with pytest.warns(UserWarning, match="fastclip"):
        fastclip.clip_grad_norm_(params, 2.0)
    after = _grads(params)
    torch.testing.assert_close(ref_norm(after).item(), 2.0, rtol=1e-12, atol=0)
    _assert_grads_scaled(params, grads, ref_coef(2.0, norm))


# -------------------------------------------------------- torch.compile
def _model_params(seed=21):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().sum().backward()
    return list(model.parameters())


def test_torch_compile_fullgraph_matches_eager():
    # backend="inductor" (the default): tracing plus codegen of this small
    # graph takes a few seconds on a 2-core CPU.
    torch._dynamo.reset()
    params, eager_params = _model_params(), _model_params()
    compiled = torch.compile(fastclip.clip_grad_norm_, fullgraph=True)
    total = compiled(params, 0.1)
    expected = fastclip.clip_grad_norm_(eager_params, 0.1)
    assert_same_bits(total, expected)
    for p, q in zip(params, eager_params):
        assert_same_bits(p.grad, q.grad)


@pytest.mark.skipif(fastclip._torch_release(torch.__version__) < (2, 8),
                    reason="the inductor of torch 2.6 and 2.7 fails on this graph (an AssertionError in its "
                           "scheduler); it compiles on 2.8 to 2.14")
def test_torch_compile_fullgraph_split_path_matches_eager(fresh_warnings):
    # A complex gradient sends the list through the split path (kernels and
    # plain PyTorch); its checks before writing are skipped while dynamo
    # traces (torch.is_inference_mode_enabled() breaks a graph).
    torch._dynamo.reset()
    grads = [torch.linspace(-2.0, 3.0, 40), torch.complex(torch.ones(6), torch.linspace(0.0, 1.0, 6))]
    params, eager_params = make_params(grads), make_params(grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's once-only notice
        total = torch.compile(fastclip.clip_grad_norm_, fullgraph=True)(params, 0.1)
        expected = fastclip.clip_grad_norm_(eager_params, 0.1)
    assert_same_bits(total, expected)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_torch_compile_max_norm_schedule_compiles_once(kind):
    """A max_norm that changes from call to call (a schedule) stays one
    graph after dynamo makes it dynamic, as torch's does (found in review:
    the fused op's float argument specialized a graph per value, and a
    tensor failed fullgraph on a data-dependent guard); every value gives
    eager's bits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    # aot_eager: a plain counting backend skipped the pass that had made a
    # graph per value (found in review).
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fastclip.clip_grad_norm_, fullgraph=True, backend=counter)
    for max_norm in (0.1, 0.2, 0.3, 0.05, 7.5):
        params, eager_params = _model_params(), _model_params()
        value = max_norm if kind == "float" else torch.tensor(max_norm)
        total = compiled(params, value)
        expected = fastclip.clip_grad_norm_(eager_params, float(value))
        assert_same_bits(total, expected)
        for p, q in zip(params, eager_params):
            assert_same_bits(p.grad, q.grad)
    assert counter.frame_count <= 2


@pytest.mark.parametrize("fn", ["get_total_norm", "clip_grad_norm_tensor_max_norm"])
def test_torch_compile_fullgraph_error_if_nonfinite_checks_in_the_graph(fn):
    """get_total_norm(error_if_nonfinite=True), and clip_grad_norm_ with a
    tensor max_norm and it, compile with fullgraph=True (they failed on a
    data-dependent guard, as torch's do): the graph checks the norm and
    raises torch's error before anything is written."""
    torch._dynamo.reset()
    params = _model_params()
    if fn == "get_total_norm":
        call = lambda ps: fastclip.get_total_norm([p.grad for p in ps], 2.0, error_if_nonfinite=True)
    else:
        call = lambda ps: fastclip.clip_grad_norm_(ps, torch.tensor(0.1), error_if_nonfinite=True)
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    eager_params = clone_params(params)
    assert_same_bits(compiled(params), call(eager_params))
    for p, q in zip(params, eager_params):
        assert_same_bits(p.grad, q.grad)
    params[0].grad.view(-1)[0] = math.nan
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        compiled(params)
    for p, b in zip(params, before):
        assert_same_bits(p.grad, b)


def test_torch_compile_float_total_norm_schedule_compiles_once():
    """clip_grads_with_norm_ with a float total_norm that changes from call
    to call stays one graph after dynamo makes it dynamic (found in review:
    torch.tensor(total_norm) specialized a graph per value, and fullgraph
    hit the recompile limit); every value gives eager's bits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fastclip.clip_grads_with_norm_, fullgraph=True, backend=counter)
    for total_norm in (3.0, 4.5, 7.0, 9.25, 12.0):
        params, eager_params = _model_params(), _model_params()
        compiled(params, 1.0, total_norm)
        fastclip.clip_grads_with_norm_(eager_params, 1.0, total_norm)
        for p, q in zip(params, eager_params):
            assert_same_bits(p.grad, q.grad)
    assert counter.frame_count <= 2


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_"])
def test_torch_compile_refuses_bad_max_norm_after_it_became_dynamic(fn):
    """Once a schedule has made max_norm a symbolic float, inf, NaN and a
    negative value are still refused (ValueError, as eager; found in review:
    inf was taken as "no clipping", the symbol being assumed finite), and
    the values after them still compile to the same graph's results."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    call = getattr(fastclip, fn)
    extra = () if fn == "clip_grad_norm_" else (torch.tensor(5.0),)
    compiled = torch.compile(lambda ps, m: call(ps, m, *extra), backend=counter)
    for max_norm in (0.1, 0.2, math.inf, math.nan, -1.0, 0.3):
        params, eager_params = _model_params(), _model_params()
        if not 0.0 <= max_norm < math.inf:
            before = snapshot(_grads(params))
            with pytest.raises(ValueError, match="max_norm must be a finite number >= 0"):
                compiled(params, max_norm)
            assert_untouched(_grads(params), before)
            continue
        compiled(params, max_norm)
        call(eager_params, max_norm, *extra)
        for p, q in zip(params, eager_params):
            assert_same_bits(p.grad, q.grad)


def _skip_unless_torch_compiles_it(fn: str, arg, item: bool) -> None:
    """Skip where this torch's dynamo cannot compile torch's own function
    with such an argument (2.8 to 2.10 cannot: "Data dependent operator")."""
    call = getattr(torch.nn.utils, fn)
    extra = (torch.tensor(5.0),) if fn == "clip_grads_with_norm_" else ()
    torch._dynamo.reset()
    compiled = torch.compile(lambda ps, m: call(ps, m.item() if item else m, *extra), fullgraph=True, backend="eager")
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=item):
            compiled(_model_params(), arg)
    except Exception as e:  # noqa: BLE001 (dynamo's error classes differ by release)
        pytest.skip(f"torch {torch.__version__} does not compile torch.nn.utils.{fn} with it either: {type(e).__name__}")
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(fastclip._torch_release(torch.__version__) < (2, 8),
                    reason="before torch 2.8 dynamo cannot leave a comparison undecided (guard_or_true)")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("value", ["numpy", "item", "tensor"])
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_torch_compile_takes_a_bound_the_trace_cannot_read(fn, value, backend):
    """A numpy float32 argument, or .item() under capture_scalar_outputs, is
    a float dynamo cannot read while tracing (an unbacked symbol): torch's
    functions compile with it as max_norm or clip_value, and fastclip's
    range checks stopped the trace (found in review). It now goes unchecked,
    as a max_norm tensor does, and gives eager's result; a tensor
    clip_value too."""
    if value == "tensor" and fn != "clip_grad_value_":
        pytest.skip("a tensor max_norm is the schedule test's")
    np = pytest.importorskip("numpy")
    bound = 0.05
    _skip_unless_torch_compiles_it(fn, np.float32(bound) if value == "numpy" else torch.tensor(bound), value == "item")
    call = getattr(fastclip, fn)
    extra = (torch.tensor(5.0),) if fn == "clip_grads_with_norm_" else ()
    if value == "numpy":
        arg, compiled = np.float32(bound), torch.compile(lambda ps, m: call(ps, m, *extra), fullgraph=True, backend=backend)
    elif value == "tensor":
        arg, compiled = torch.tensor(bound), torch.compile(lambda ps, m: call(ps, m), fullgraph=True, backend=backend)
    else:
        arg = torch.tensor(bound)
        compiled = torch.compile(lambda ps, m: call(ps, m.item(), *extra), fullgraph=True, backend=backend)
    params, eager_params = _model_params(), _model_params()
    with torch._dynamo.config.patch(capture_scalar_outputs=value == "item"):
        got = compiled(params, arg)
    expected = call(eager_params, float(np.float32(bound)) if value == "numpy" else bound, *extra)
    if fn == "clip_grad_norm_":
        assert_same_bits(got, expected)
    for p, q in zip(params, eager_params):
        if fn == "clip_grad_value_":
            assert_same_bits(p.grad, q.grad)
        else:  # the split path's product: within an ulp of the fused op's
            torch.testing.assert_close(p.grad, q.grad, rtol=2**-23, atol=0)
    assert any(not torch.equal(p.grad, g) for p, g in zip(params, _model_params()) for g in [g.grad])


@pytest.mark.skipif(fastclip._torch_release(torch.__version__) < (2, 8),
                    reason="before torch 2.8 dynamo cannot leave a comparison undecided (guard_or_true)")
def test_torch_compile_refuses_an_unreadable_max_norm_with_error_if_nonfinite():
    """The fused op, which raises from inside the graph, takes a float the
    host knows: with a max_norm the trace cannot read, a clear ValueError
    (torch's own function cannot compile error_if_nonfinite at all)."""
    np = pytest.importorskip("numpy")
    _skip_unless_torch_compiles_it("clip_grad_norm_", np.float32(0.05), item=False)
    compiled = torch.compile(lambda ps, m: fastclip.clip_grad_norm_(ps, m, error_if_nonfinite=True),
                             fullgraph=True, backend="aot_eager")
    params = _model_params()
    before = snapshot(_grads(params))
    with pytest.raises(Exception, match="max_norm must be a Python number or a tensor under torch.compile"):
        compiled(params, np.float32(0.05))
    assert_untouched(_grads(params), before)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_functionalize_traces_like_torch(fn):
    """Under torch.func.functionalize the lists go through plain PyTorch: its
    C++ functionalization cannot run a custom op that writes a list in
    place (found in review: clip_grad_norm_ failed where torch's traced)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(module):
        def f(a, b):
            params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
            params[0].grad, params[1].grad = a, b
            if fn == "clip_grad_norm_":
                out = module.clip_grad_norm_(params, 1.0)
            elif fn == "clip_grads_with_norm_":
                out = module.clip_grads_with_norm_(params, 1.0, torch.tensor(12.0))
            else:
                out = module.clip_grad_value_(params, 2.5)
            return out, a, b
        return f

    inputs = (torch.tensor([3.0, -4.0, 0.0]), torch.tensor([12.0, 1e-3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = make_fx(torch.func.functionalize(run(fastclip)))(*(x.clone() for x in inputs))
        theirs = make_fx(torch.func.functionalize(run(torch.nn.utils)))(*(x.clone() for x in inputs))
        got, expected = ours(*(x.clone() for x in inputs)), theirs(*(x.clone() for x in inputs))
    for g, e in zip(got, expected):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-6, atol=0)


def test_torch_compile_fullgraph_error_if_nonfinite():
    """With error_if_nonfinite the compiled call keeps the fused op, which
    raises from inside the graph (found in review: the split path's host
    read of the flag broke fullgraph)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda ps: fastclip.clip_grad_norm_(ps, 0.1, error_if_nonfinite=True), fullgraph=True)
    params, eager_params = _model_params(), _model_params()
    assert_same_bits(compiled(params), fastclip.clip_grad_norm_(eager_params, 0.1))
    params[0].grad[0, 0] = math.nan
    before = snapshot(_grads(params))
    with pytest.raises(RuntimeError, match="non-finite"):
        compiled(params)
    for g, (copy, _) in zip(_grads(params), before):  # values (the compiled graph bumps versions)
        assert_same_bits(g, copy)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_coefficient_of_a_tensor_max_norm_has_the_bits_of_a_float_one(dtype):
    """The tensor arithmetic a device or traced max_norm goes through gives
    the fused op's coefficient, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        grads = make_grads([(37,), (5, 9)], dtype, "cpu", seed=int(torch.randint(1 << 30, (), generator=gen)))
        max_norm = float(torch.rand((), dtype=torch.float64, generator=gen)) * float(ref_norm(grads, 2.0))
        norm64, _ = fastclip._ops.multi_tensor_norm(grads, 2.0, False, True)
        from_tensor = fastclip.clip._coefficient(torch.tensor(max_norm, dtype=torch.float64), norm64)
        assert_same_bits(from_tensor, fastclip.clip._coefficient(max_norm, norm64))
        clipped = [g.clone() for g in grads]
        fastclip._ops.clip_(clipped, max_norm, 2.0)
        fastclip._ops.multi_tensor_scale_(grads, from_tensor)
        for a, b in zip(grads, clipped):
            assert_same_bits(a, b)


def test_tensor_max_norm():
    """A one-element real tensor is taken as torch takes it; on the CPU its
    value is checked (the host reads it for free); other tensors are refused."""
    params, eager_params = _model_params(), _model_params()
    total = fastclip.clip_grad_norm_(params, torch.tensor([0.1], dtype=torch.float64))
    assert_same_bits(total, fastclip.clip_grad_norm_(eager_params, 0.1))
    for p, q in zip(params, eager_params):
        assert_same_bits(p.grad, q.grad)
    before = snapshot(_grads(params))
    for bad, error in ((torch.tensor(-1.0), ValueError), (torch.tensor(math.nan), ValueError),
                       (torch.ones(2), ValueError), (torch.tensor(1j), TypeError)):
        with pytest.raises(error, match="max_norm"):
            fastclip.clip_grad_norm_(params, bad)
        with pytest.raises(error, match="max_norm"):
            fastclip.clip_grads_with_norm_(params, bad, torch.tensor(1.0))
    assert_untouched(_grads(params), before)


def test_torch_compile_fullgraph_get_total_norm_and_grad_norms():
    torch._dynamo.reset()
    params = _model_params()
    grads = _grads(params)
    compiled = torch.compile(lambda gs: fastclip.get_total_norm(gs, 3.5), fullgraph=True)
    assert_same_bits(compiled(grads), fastclip.get_total_norm(grads, 3.5))
    # grad_norms over parameters, one without a gradient (its norm 0): the
    # name promised it, the body did not compile it (found in review).
    with_none = [*params, torch.nn.Parameter(torch.ones(3))]
    total, each = torch.compile(lambda ps: fastclip.grad_norms(ps, 3.5), fullgraph=True)(with_none)
    eager_total, eager_each = fastclip.grad_norms(with_none, 3.5)
    assert_same_bits(total, eager_total)
    assert_same_bits(each, eager_each)
    assert each[-1].item() == 0.0 and each.shape == (len(with_none),)



def test_grad_norms_under_fake_tensor_mode_and_make_fx_with_a_none_gradient():
    """The positions of the gradients that exist, under a dispatch mode:
    the C++ gather's index tensor became the mode's (found in review: a
    FakeTensorMode's, which has no memory to write them to)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def params():
        a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 2, 4))
        a.grad, c.grad = torch.full((3,), 2.0), torch.full((4,), 1.0)
        return [a, b, c]

    with FakeTensorMode():
        total, each = fastclip.grad_norms(params())
        assert total.shape == () and each.shape == (3,) and each.dtype == torch.float32
    for mode in ("real", "fake", "symbolic"):
        total, each = make_fx(lambda: fastclip.grad_norms(params()), tracing_mode=mode)()()
        assert_same_bits(each, torch.tensor([math.sqrt(12.0), 0.0, 2.0]))
        assert total.item() == pytest.approx(4.0, rel=1e-7)


# -------------------------------------------------------------- devices
@pytest.mark.filterwarnings("ignore:fastclip")  # devices without kernels use the fallback
@pytest.mark.parametrize("ord", [2.0, math.inf], ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_clip_grad_norm_on_device(device, dtype, ord):
    grads = make_grads(SHAPES_NO_EMPTY, dtype, device, seed=24)
    params = make_params(grads)
    norm = ref_norm(grads, ord)
    max_norm = 0.3 * norm.item()
    total = fastclip.clip_grad_norm_(params, max_norm, ord)
    assert total.device.type == device
    assert_norm_close(total, norm, dtype)
    _assert_grads_scaled(params, grads, ref_coef(max_norm, norm))


@pytest.mark.skipif(not HAS_CUDA, reason="several devices need a CUDA device")
@pytest.mark.filterwarnings("ignore:fastclip")
@pytest.mark.parametrize("first", ["cpu", "cuda"])
def test_several_devices_cuda_and_cpu(first):
    other = "cuda" if first == "cpu" else "cpu"
    grads = make_grads([(17,), (4, 9)], torch.float32, first, seed=25) + make_grads([(33,)], torch.float32, other, 26)
    params = make_params(grads)
    norm = ref_norm(grads)
    total, each = fastclip.grad_norms(params)
    assert total.device.type == first and each.device.type == first
    assert_norm_close(each, ref_norms_each(grads))
    total = fastclip.clip_grad_norm_(params, 0.5 * norm.item())
    assert total.device.type == first
    assert_norm_close(total, norm)
    _assert_grads_scaled(params, grads, ref_coef(0.5 * norm.item(), norm))
    for p, g in zip(params, grads):
        assert p.grad.device == g.device


# ---------------------------------------------------------------- info
def test_backend_and_build_info():
    assert fastclip.backend().startswith("extension")
    assert "cpu" in fastclip.backend()
    assert fastclip.build_info()["version"] == fastclip.__version__


@pytest.mark.parametrize("version", ["2.5.1+cpu", "2.4.0", "1.13.1"])
def test_import_refuses_a_torch_older_than_the_tested_one(version):
    # Under torch 2.4 over 100 tests failed (missing torch APIs): an import
    # error that says so, not results that are quietly wrong.
    import pathlib
    import subprocess
    import sys

    code = f"import torch; torch.__version__ = {version!r}; import fastclip"
    root = str(pathlib.Path(fastclip.__file__).parent.parent)
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"ImportError: fastclip needs torch >= 2.6, found torch {version}" in done.stderr


def test_build_refuses_a_torch_older_than_the_tested_one():
    # Before minutes of compiling, not at the first import.
    import pathlib
    import subprocess
    import sys

    import os

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "FASTCLIP_CPU_ONLY": "1"}  # setup.py decides the build at import: no CUDA check here
    env.pop("FASTCLIP_FORCE_CUDA", None)
    code = "import sys, runpy, torch; torch.__version__ = '2.5.1'; sys.argv = ['setup.py', '--version']; " \
           "runpy.run_path('setup.py', run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "RuntimeError: fastclip needs torch >= 2.6, found torch 2.5.1: upgrade torch first" in done.stderr
    same = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)  # the installed torch passes
    assert same.returncode == 0 and same.stdout.strip().endswith(fastclip.__version__), same.stderr


_FAKE_NVCC = """#!/bin/sh
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release {release}, V{release}.1"
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvcc is a shell script")
@pytest.mark.parametrize(
    "torch_cuda, nvcc, force, expected",
    [
        ("12.8", "13.0", False, "CPU-only build (nvcc 13.0 at {home} and torch's CUDA 12.8 differ in major version"),
        ("12.8", "13.0", True, "FASTCLIP_FORCE_CUDA=1 but CUDA cannot be built: nvcc 13.0 at {home} and torch's "
                               "CUDA 12.8 differ in major version, which torch cannot build with: set CUDA_HOME "
                               "to a CUDA 12 toolkit"),
        ("12.8", "12.4", False, "CUDA + CPU build (CUDA 12.8 at {home})"),
        ("13.0", None, False, "CPU-only build (nvcc at {home}/bin/nvcc did not run"),
    ],
    ids=["major-differs", "major-differs-forced", "minor-differs", "no-nvcc"],
)
def test_build_decides_cpu_only_when_torch_cannot_build_with_this_nvcc(tmp_path, torch_cuda, nvcc, force, expected):
    # torch's BuildExtension refuses an nvcc of another CUDA major version
    # than torch's (a PyPI torch for CUDA 12 next to a CUDA 13 toolkit): the
    # install failed there, where a missing nvcc gives a CPU-only build.
    import os
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "bin").mkdir()
    (tmp_path / "include").mkdir()  # a toolkit with headers (setup.py looks for another one without)
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    if nvcc is not None:
        script = tmp_path / "bin" / "nvcc"
        script.write_text(_FAKE_NVCC.format(release=nvcc))
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCLIP_CPU_ONLY", "FASTCLIP_FORCE_CUDA")}
    if force:
        env["FASTCLIP_FORCE_CUDA"] = "1"
    code = ("import sys, runpy, torch, torch.utils.cpp_extension as ext; "
            f"torch.version.cuda = {torch_cuda!r}; ext.CUDA_HOME = {str(tmp_path)!r}; "
            "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert expected.format(home=tmp_path) in done.stdout + done.stderr, done.stdout + done.stderr
    assert (done.returncode != 0) == force


def test_torch_release_reads_every_kind_of_version():
    release = fastclip._torch_release
    assert release("2.6.0") == (2, 6) and release("2.13.0+cpu") == (2, 13)
    assert release("2.6.0a0+git1234abc") == (2, 6) and release("2.10.0.dev20250101+cu128") == (2, 10)
    assert release("2.7.0rc1") == (2, 7)
    for odd in ("main", "v2.6.0", "2", ""):  # no release named: not refused
        assert release(odd) == fastclip._version.UNKNOWN_RELEASE >= fastclip._MIN_TORCH
    assert release(torch.__version__) >= fastclip._MIN_TORCH  # this suite runs on a supported torch


def test_installed_package_carries_its_type_marker(tmp_path):
    # PEP 561: without py.typed in the installed package, type checkers
    # ignore fastclip's annotations. build_py copies what an install copies
    # of the Python package (without compiling the extension).
    import pathlib
    import subprocess
    import sys

    import os

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "FASTCLIP_CPU_ONLY": "1"}  # setup.py decides the build at import: no CUDA check here
    env.pop("FASTCLIP_FORCE_CUDA", None)
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=root,
                   env=env, check=True, capture_output=True)
    assert (tmp_path / "fastclip" / "py.typed").is_file()
    assert (tmp_path / "fastclip" / "clip.py").is_file()


def _neg_view_params():
    base = torch.tensor([3.0, -4.0, 12.0, 0.5])
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch._neg_view(base), torch.tensor([1.0, -2.0])
    return [a, b], base


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_"])
def test_torch_compile_with_a_negative_bit_view_gradient_matches_eager(fn):
    """Found in review: under torch.compile a negative-bit view reached the
    in-place ops, which torch's Negative fallback refuses for a list
    written in place; their Negative kernels take it now."""
    call = {
        "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 1.0),
        "clip_grad_value_": lambda ps: fastclip.clip_grad_value_(ps, 2.0),
        "clip_grads_with_norm_": lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, torch.tensor(13.0)),
    }[fn]
    torch._dynamo.reset()
    params, base = _neg_view_params()
    eager_params, eager_base = _neg_view_params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager path's fallback notice
        out = torch.compile(call, fullgraph=True, backend="aot_eager")(params)
        expected = call(eager_params)
    if out is not None:
        assert_same_bits(out, expected)
    assert_same_bits(base, eager_base)
    assert_same_bits(params[1].grad, eager_params[1].grad)


@pytest.mark.parametrize("op", ["scale", "clamp", "clip"])
def test_ops_take_negative_bit_views(op):
    # The ops' Negative kernels: the same memory as torch's loop on the views.
    ours, theirs = _neg_view_params()[1], _neg_view_params()[1]
    view, ref = torch._neg_view(ours), torch._neg_view(theirs)
    if op == "scale":
        torch.ops.fastclip.multi_tensor_scale_([view], torch.tensor(0.5))
        ref.mul_(0.5)
    elif op == "clamp":
        torch.ops.fastclip.multi_tensor_clamp_([view], 2.0)
        ref.clamp_(-2.0, 2.0)
    else:
        norm = torch.ops.fastclip.clip_([view], 1.0, 2.0)
        assert_same_bits(norm, torch.linalg.vector_norm(theirs))
        ref.mul_(float(1.0 / (torch.linalg.vector_norm(theirs.double()) + 1e-6)))
    if op == "clip":
        torch.testing.assert_close(ours, theirs, rtol=2e-7, atol=0)
    else:
        assert_same_bits(ours, theirs)


def test_scale_by_a_negative_bit_view_coefficient():
    # Its value, not its stored bytes (the GPU kernels read the bytes).
    t = torch.tensor([1.0, -2.0, 4.0])
    torch.ops.fastclip.multi_tensor_scale_([t, torch._neg_view(torch.zeros(2))], torch._neg_view(torch.tensor(-0.5)))
    assert_same_bits(t, torch.tensor([0.5, -1.0, 2.0]))


@pytest.mark.parametrize("op", ["scale", "clamp", "clip"])
def test_ops_on_a_negative_bit_view_bump_its_base_version(op):
    # Found in review: the view the Negative kernels write through had a
    # version counter of its own, so autograd used overwritten values
    # silently (a gradient 3x too large) where torch raises.
    x = torch.tensor([0.5, 1.0], requires_grad=True)
    y = x.exp()  # saved for backward
    view = torch._neg_view(y)
    before = y._version
    with torch.no_grad():
        if op == "scale":
            torch.ops.fastclip.multi_tensor_scale_([view], torch.tensor(3.0))
        elif op == "clamp":
            torch.ops.fastclip.multi_tensor_clamp_([view], 1.0)
        else:
            torch.ops.fastclip.clip_([view], 1.0, 2.0)
    assert y._version > before and view._version == y._version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_vmap_per_sample_norms_with_the_kernels_loaded(dtype, ord, fresh_warnings):
    """Found in review: batched tensors reached the ops, which had no
    batching rule (torch's foreach=False computes them). The ops' rules
    compute them now (tests/test_vmap.py); an unbatched tensor in the list
    too."""
    require_kernel("cpu")
    x = make_grads([(4, 37)], dtype, seed=29, scale=3.0)[0]
    fixed = make_grads([(5,)], dtype, seed=30)[0]
    batched = torch.vmap(lambda a: fastclip.get_total_norm([a, a * 2, fixed], ord))(x)
    expected = torch.stack([ref_norm([row, row * 2, fixed], ord) for row in x])
    assert batched.shape == (4,)
    assert_norm_close(batched, expected, dtype)


def _numpy_scalar(kind: str, value):
    np = pytest.importorskip("numpy")
    return getattr(np, kind)(value)


_MAX_NORMS = {
    "int": (lambda: 1, 1.0),
    "bool": (lambda: True, 1.0),
    "np.float32": (lambda: _numpy_scalar("float32", 0.5), 0.5),
    "tensor_0d": (lambda: torch.tensor(0.5), 0.5),
    "tensor_1": (lambda: torch.tensor([0.5]), 0.5),
    "tensor_int": (lambda: torch.tensor(1), 1.0),
}
_NORM_TYPES = {
    "str_inf": (lambda: "inf", math.inf),
    "np.int64": (lambda: _numpy_scalar("int64", 1), 1.0),
    "np.float64": (lambda: _numpy_scalar("float64", 3.5), 3.5),
    "tensor": (lambda: torch.tensor(3.0), 3.0),
    "int": (lambda: 2, 2.0),
}


@pytest.mark.parametrize("norm_type", list(_NORM_TYPES))
@pytest.mark.parametrize("max_norm", list(_MAX_NORMS))
def test_argument_types_give_the_float_arguments_result(max_norm, norm_type):
    """Each kind of number torch's float() takes, as max_norm and norm_type:
    the bits of the same call with plain floats (found in review: nothing
    checked them side by side), and the norm within 1e-2 of torch's."""
    (make_max, max_value), (make_ord, ord_value) = _MAX_NORMS[max_norm], _NORM_TYPES[norm_type]
    # (No 0-size gradient: torch's inf-norm refuses one.)
    shapes = [shape for shape in SHAPES if math.prod(shape) > 0]
    ours, plain, theirs = (_params(seed=31, scale=3.0, shapes=shapes) for _ in range(3))
    total = fastclip.clip_grad_norm_(ours, make_max(), make_ord())
    expected = fastclip.clip_grad_norm_(plain, max_value, ord_value)
    assert_same_bits(total, expected)
    for p, q in zip(ours, plain):
        if p.grad is not None:
            assert_same_bits(p.grad, q.grad)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(theirs, make_max(), make_ord()).float(),
                               rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"])
def test_inside_inference_mode_like_torch(fn):
    """Ordinary gradients clipped inside torch.inference_mode() (found in
    review: only inference tensors were tested there): torch's result, and
    the version counters bumped as torch's in-place ops bump them."""
    ours, theirs = _params(seed=33, scale=3.0), _params(seed=33, scale=3.0)
    calls = {
        "clip_grad_norm_": lambda m, ps: m.clip_grad_norm_(ps, 0.5),
        "get_total_norm": lambda m, ps: m.get_total_norm(_grads(ps)),
        "clip_grads_with_norm_": lambda m, ps: m.clip_grads_with_norm_(ps, 0.5, torch.tensor(4.0)),
        "clip_grad_value_": lambda m, ps: m.clip_grad_value_(ps, 0.2),
    }
    versions = [g._version for g in _grads(ours)]
    with torch.inference_mode():
        got = calls[fn](fastclip, ours)
        expected = calls[fn](torch.nn.utils, theirs)
    if got is not None:
        torch.testing.assert_close(got, expected.float(), rtol=TORCH_RTOL, atol=0.0)
    _assert_grads_match_torch(ours, theirs)
    wrote = fn != "get_total_norm"
    assert [g._version > v for g, v in zip(_grads(ours), versions)] == [wrote] * len(versions)


def test_concurrent_callers_get_the_serial_bits():
    """Several Python threads calling the ops at once (the kernels share no
    state between calls; found in review: nothing tested it): each list's
    norm and clipped values are the bits of the same call made alone."""
    import threading

    def lists():
        return [make_params(make_grads([(40_000,), (33, 17), (5,)], dtype, "cpu", seed=40 + k, scale=3.0))
                for k, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64])]

    serial, parallel = lists(), lists()
    expected = [fastclip.clip_grad_norm_(ps, 0.1, ord) for ps, ord in zip(serial, ORDS)]
    results, errors = [None] * len(parallel), []

    def work(k):
        try:
            for _ in range(30):
                for p, q in zip(parallel[k], lists()[k]):
                    p.grad.copy_(q.grad)  # start from the same gradients each time
                total = fastclip.clip_grad_norm_(parallel[k], 0.1, ORDS[k])
                # Every call, not the last one only (found in review).
                assert_same_bits(total, expected[k])
                for p, q in zip(parallel[k], serial[k]):
                    assert_same_bits(p.grad, q.grad)
                results[k] = total
        except Exception as error:  # AssertionError too: reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(parallel))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want, ps, qs in zip(results, expected, parallel, serial):
        assert_same_bits(got, want)
        for p, q in zip(ps, qs):
            assert_same_bits(p.grad, q.grad)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_"])
def test_vmap_per_sample_clipping_with_the_kernels_loaded(fn, fresh_warnings):
    """Found in review: the in-place functions checked a batched gradient's
    storage (which it has not) and read a batched coefficient with item()."""
    require_kernel("cpu")
    x, y = make_grads([(3, 5), (3, 4)], torch.float32, seed=35, scale=3.0)
    calls = {
        "clip_grad_norm_": lambda m, ps: m.clip_grad_norm_(ps, 1.0, foreach=False),
        "clip_grads_with_norm_": lambda m, ps: (m.clip_grads_with_norm_(ps, 1.0, torch.tensor(10.0), foreach=False),
                                                torch.zeros(()))[1],
        "clip_grad_value_": lambda m, ps: (m.clip_grad_value_(ps, 0.5, foreach=False), torch.zeros(()))[1],
    }

    def per_sample(module):
        def f(a, b):
            pa, pb = torch.nn.Parameter(torch.zeros_like(a)), torch.nn.Parameter(torch.zeros_like(b))
            pa.grad, pb.grad = a.clone(), b.clone()
            return calls[fn](module, [pa, pb]), pa.grad, pb.grad
        return f

    ours = torch.vmap(per_sample(fastclip))(x, y)
    theirs = torch.vmap(per_sample(torch.nn.utils))(x, y)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.float(), rtol=TORCH_RTOL, atol=0.0)
