"""The plain-PyTorch fallback, as used when the compiled extension is missing.

The ``fallback`` fixture makes ``fastclip`` believe that ``fastclip._C``
could not be loaded: ``_ops.available()`` returns False and no device has
kernels. Every public function must then give the results it gives with the
extension, and warn once that it is running without it.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import fastclip
import fastclip.clip
from fastclip import _fallback, _ops
from testing import (
    check_norm_paths,
    filled,
    assert_identical,
    assert_norm_close,
    assert_same_bits,
    assert_scaled_close,
    clone_params,
    dtype_id,
    make_grads,
    make_params,
    ord_id,
    ref_coef,
    ref_norm,
    ref_norms_each,
    ref_scaled,
)

SHAPES = [(17,), (4, 9), (), (2, 3, 5), (123,)]  # 0-size tensors: test_fallback_with_empty_tensor


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setattr(_ops, "available", lambda: False)
    monkeypatch.setattr(fastclip.clip, "_KERNEL_DEVICES", frozenset())
    monkeypatch.setattr(fastclip.clip, "_warned", set())
    assert fastclip.backend().startswith("fallback")


def _params(dtype, seed):
    grads = make_grads(SHAPES, dtype, seed=seed, scale=2.0)
    grads.insert(2, None)
    return make_params(grads)


def _grads(params):
    return [p.grad for p in params if p.grad is not None]


def _fastclip_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "fastclip" in str(w.message)]


def _run_all(params, ord):
    """Every public function once; what they return and the final gradients."""
    grads = _grads(params)
    out = {
        "get_total_norm": fastclip.get_total_norm(grads, ord),
        "grad_norms": fastclip.grad_norms(params, ord),
    }
    norm = out["get_total_norm"].item()
    out["clip_grad_norm_"] = fastclip.clip_grad_norm_(params, 0.5 * norm, ord)
    fastclip.clip_grads_with_norm_(params, 0.25 * norm, torch.tensor(0.5 * norm))
    fastclip.clip_grad_value_(params, 0.1)
    return out


# Every dtype and order the kernels cover (fp16, fp64 and 3.5 were missing: found in review).
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALL_ORDS = [2.0, 1.0, math.inf, 3.5]


@pytest.mark.parametrize("ord", ALL_ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_fallback_gives_the_extension_results(dtype, ord, request):
    with_extension = _params(dtype, seed=1)
    without = clone_params(with_extension)
    grads = [g.clone() for g in _grads(with_extension)]
    norm = ref_norm(grads, ord)
    expected = _run_all(with_extension, ord)

    request.getfixturevalue("fallback")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _run_all(without, ord)

    assert len(_fastclip_warnings(record)) == 1, [str(w.message) for w in record]
    for name in ("get_total_norm", "clip_grad_norm_"):
        assert_norm_close(got[name], expected[name], dtype)
        assert_norm_close(got[name], norm, dtype)
    assert_norm_close(got["grad_norms"][0], expected["grad_norms"][0], dtype)
    assert_norm_close(got["grad_norms"][1], expected["grad_norms"][1], dtype)
    assert got["grad_norms"][1][2].item() == 0.0
    assert_norm_close(got["grad_norms"][1][[0, 1, 3, 4, 5]], ref_norms_each(grads, ord), dtype)
    for p, q in zip(without, with_extension):
        if q.grad is None:
            assert p.grad is None
        else:
            assert_scaled_close(p.grad, ref_scaled(q.grad, 1.0))


@pytest.mark.parametrize("ord", ALL_ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_fallback_clip_against_reference(dtype, ord, fallback):
    params = _params(dtype, seed=2)
    grads = [g.clone() for g in _grads(params)]
    norm = ref_norm(grads, ord)
    max_norm = 0.3 * norm.item()
    with pytest.warns(UserWarning, match="fastclip"):
        total = fastclip.clip_grad_norm_(params, max_norm, ord)
    assert_norm_close(total, norm, dtype)
    for p, g in zip(_grads(params), grads):
        assert_scaled_close(p, ref_scaled(g, ref_coef(max_norm, norm)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_fallback_clip_grads_with_norm_against_reference(dtype, fallback):
    params = _params(dtype, seed=4)
    grads = [g.clone() for g in _grads(params)]
    total = torch.tensor(7.5)
    with pytest.warns(UserWarning, match="fastclip"):
        fastclip.clip_grads_with_norm_(params, 3.0, total)
    coef = ref_coef(3.0, total)
    assert 0.3 < coef.item() < 0.5
    for p, g in zip(_grads(params), grads):
        assert_scaled_close(p, ref_scaled(g, coef))


@pytest.mark.parametrize("ord", [2.0, 1.0, math.inf], ids=ord_id)
def test_fallback_with_empty_tensor(ord, fallback):
    grads = make_grads([(7,), (3, 0), (0,)], seed=6)
    params = make_params(grads)
    check_norm_paths(fastclip, grads, params, ord)


FLOAT8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("ord", [2.0, 1.0, math.inf, 3.5], ids=ord_id)
@pytest.mark.parametrize("dtype", FLOAT8_DTYPES, ids=dtype_id)
def test_float8_norms_against_reference(dtype, ord):
    """float8 gradients (which torch's norms refuse): the fallback's norms,
    total and per tensor, in a list with float32 ones."""
    gen = torch.Generator().manual_seed(8)
    tensors = [torch.randn(shape, generator=gen).mul_(100).to(dtype) for shape in [(5, 123), (1,), (0,), (77,)]]
    tensors.append(torch.randn(9, generator=gen))
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning (once per process)
        total, each = fastclip.grad_norms(params, ord)
        alone = fastclip.get_total_norm(tensors, ord)
    torch.testing.assert_close(total, ref_norm(tensors, ord).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(each, ref_norms_each(tensors, ord).float(), rtol=1e-6, atol=0)
    assert torch.equal(alone, total)


@pytest.mark.parametrize("dtype", FLOAT8_DTYPES, ids=dtype_id)
def test_float8_nonfinite_norm(dtype):
    bad = torch.tensor([1.0, float("nan")]).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isnan(fastclip.get_total_norm([bad]))
        with pytest.raises(RuntimeError, match="non-finite"):
            fastclip.get_total_norm([bad], error_if_nonfinite=True)


def test_fallback_clip_grad_value_keeps_nan(fallback):
    params = _params(torch.float32, seed=3)
    params[0].grad[4] = math.nan
    torch_params = clone_params(params)
    with pytest.warns(UserWarning, match="fastclip"):
        fastclip.clip_grad_value_(params, 0.3)
    torch.nn.utils.clip_grad_value_(torch_params, 0.3)
    for p, q in zip(_grads(params), _grads(torch_params)):
        assert_identical(p, q)


def test_fallback_coefficient_one_writes_nothing(fallback):
    # As the ops: a clip by a coefficient of exactly 1 leaves every gradient
    # and its version counter as it was (found in review: mul_ wrote them).
    params = _params(torch.float32, seed=3)
    before = [(p.grad.clone(), p.grad._version) for p in params if p.grad is not None]
    norm = fastclip.get_total_norm(_grads(params))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastclip.clip_grad_norm_(params, 2 * norm.item())
        fastclip.clip_grads_with_norm_(params, 2 * norm.item(), norm)
    for g, (values, version) in zip(_grads(params), before):
        assert_identical(g, values)
        assert g._version == version


def test_fallback_warns_once_per_process(fallback):
    params = _params(torch.float32, seed=4)
    with pytest.warns(UserWarning, match="fastclip") as record:
        fastclip.clip_grad_norm_(params, 1.0)
    assert len(_fastclip_warnings(record)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        fastclip.clip_grad_norm_(params, 1.0)
        fastclip.get_total_norm(_grads(params))


def test_fallback_empty_and_errors(fallback):
    assert_same_bits(fastclip.clip_grad_norm_([], 1.0), torch.tensor(0.0))
    assert_same_bits(fastclip.get_total_norm([]), torch.tensor(0.0))
    params = _params(torch.float32, seed=5)
    with pytest.raises(TypeError, match=r"parameters\[1\]"):
        fastclip.clip_grad_norm_([params[0], 3], 1.0)
    with pytest.warns(UserWarning, match="fastclip"), pytest.raises(TypeError, match=r"tensors\[1\]"):
        fastclip.get_total_norm([params[0].grad, "x"])
    with pytest.raises(ValueError, match="max_norm"):
        fastclip.clip_grad_norm_(params, -1.0)


def test_fallback_fp16_norm_above_65504(fallback):
    """The norm of fp16 gradients in float32 also without the extension
    (an fp16 norm, torch's, is inf here)."""
    grads = [torch.full((100,), 60000.0, dtype=torch.float16)]
    params = make_params(grads)
    with pytest.warns(UserWarning, match="fastclip"):
        assert fastclip.get_total_norm(grads).item() == 600000.0
    total = fastclip.clip_grad_norm_(params, 3.0)
    assert total.item() == 600000.0
    assert_scaled_close(params[0].grad, ref_scaled(grads[0], ref_coef(3.0, ref_norm(grads, 2.0))))


@pytest.mark.parametrize(
    "value, dtype, ord",
    [(1e30, torch.float32, 2.0), (1e200, torch.float64, 2.0), (1e30, torch.float32, 12.0)],
    ids=["fp32_1e30_ord2", "fp64_1e200_ord2", "fp32_1e30_ord12"],
)
def test_fallback_extreme_values_like_extension(value, dtype, ord, fallback):
    # "Same contract as torch.ops.fastclip" (_fallback.py): the coefficient
    # comes from an accurate float64 norm, so the clipped gradients have norm
    # max_norm even where that norm itself has no float32 value.
    grads = filled([(10,), (3, 4), (5,)], value, dtype)
    params = make_params(grads)
    norm = ref_norm(grads, ord)
    with pytest.warns(UserWarning, match="fastclip"):
        fastclip.clip_grad_norm_(params, 2.0, ord)
    torch.testing.assert_close(ref_norm(_grads(params), ord).item(), 2.0, rtol=1e-5, atol=0)
    for p, g in zip(_grads(params), grads):
        assert_scaled_close(p, ref_scaled(g, ref_coef(2.0, norm)))


@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_fallback_clipped_optimizer_like_extension(fused, nan, request):
    """ClippedOptimizer without the extension (the step's scalars from
    _fallback.clip_scalars_) steps and logs as with it."""
    def run():
        params = _params(torch.float32, seed=31)
        if nan:
            params[0].grad[0] = math.nan
        opt = fastclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=fused), max_norm=0.5)
        for _ in range(2):
            opt.step()
        return params, opt

    params, opt = run()
    request.getfixturevalue("fallback")
    used = []
    monkeypatch = request.getfixturevalue("monkeypatch")
    twin = _fallback.clip_scalars_
    monkeypatch.setattr(_fallback, "clip_scalars_", lambda *a: used.append(1) or twin(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params_fb, opt_fb = run()
    assert len(used) == 2  # the fallback's twin, not the op (which this process still has)
    assert_norm_close(opt_fb.last_norm, opt.last_norm)
    assert_norm_close(opt_fb.last_clip_coef, opt.last_clip_coef)
    assert opt_fb.skipped_steps.item() == opt.skipped_steps.item() == (2 if nan else 0)
    for p, q in zip(params, params_fb):
        assert_scaled_close(q, p, rtol=2.0**-20)


def test_torch_dispatch_subclass_gradients_like_torch():
    """Gradients that are __torch_dispatch__ subclasses (a wrapper of two
    tensors) take the plain-PyTorch path, with torch's results (found in
    review: the in-place functions refused them, reading their empty
    storage as freed memory)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")

    def params():
        p = torch.nn.Parameter(two_tensor.TwoTensor(torch.zeros(4), torch.zeros(4)))
        p.grad = two_tensor.TwoTensor(torch.linspace(1.0, 4.0, 4), torch.linspace(-8.0, 2.0, 4))
        return [p]

    mine, theirs = params(), params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        total = fastclip.clip_grad_norm_(mine, 1.0)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        for t, e in ((total, expected), (mine[0].grad, theirs[0].grad)):
            torch.testing.assert_close(t.a, e.a, rtol=1e-6, atol=0)
            torch.testing.assert_close(t.b, e.b, rtol=1e-6, atol=0)
        fastclip.clip_grads_with_norm_(mine, 0.5, torch.tensor(2.0))
        torch.nn.utils.clip_grads_with_norm_(theirs, 0.5, torch.tensor(2.0))
        fastclip.clip_grad_value_(mine, 0.1)
        torch.nn.utils.clip_grad_value_(theirs, 0.1)
    torch.testing.assert_close(mine[0].grad.a, theirs[0].grad.a, rtol=1e-6, atol=0)
    torch.testing.assert_close(mine[0].grad.b, theirs[0].grad.b, rtol=1e-6, atol=0)
    assert float(mine[0].grad.b.abs().max()) == pytest.approx(0.1)  # the clamp took effect


def test_torch_dispatch_subclass_next_to_plain_gradients_like_torch():
    """A plain gradient listed with a wrapper-subclass one is written once
    (found in review: one op call took both, the subclass ran it once per
    component, and clip_grads_with_norm_ scaled the plain gradient twice)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")

    def params():
        p, q = (torch.nn.Parameter(torch.zeros(2)) for _ in range(2))
        r = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        p.grad = two_tensor.TwoTensor(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0]))
        q.grad = torch.tensor([0.0, 12.0])
        r.grad = torch.tensor([-5.0, 1.0], dtype=torch.float64)
        return [q, p, r]

    def same(mine, theirs):
        for m, t in zip(mine, theirs):
            if isinstance(t.grad, two_tensor.TwoTensor):
                torch.testing.assert_close(m.grad.a, t.grad.a, rtol=1e-6, atol=0)
                torch.testing.assert_close(m.grad.b, t.grad.b, rtol=1e-6, atol=0)
            else:
                assert type(m.grad) is torch.Tensor
                torch.testing.assert_close(m.grad, t.grad, rtol=1e-6, atol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        for name, args in (("clip_grads_with_norm_", (1.0, torch.tensor(13.0))), ("clip_grad_value_", (3.5,))):
            mine, theirs = params(), params()
            getattr(fastclip, name)(mine, *args)
            getattr(torch.nn.utils, name)(theirs, *args)
            same(mine, theirs)
        mine, theirs = params(), params()
        fastclip.clip_grads_with_norm_(mine, 1.0, 13.0)  # a float total norm
        torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, torch.tensor(13.0))
        same(mine, theirs)
        assert mine[0].grad.tolist() == pytest.approx([0.0, 12.0 / 13.0])
        # Compiled too (found in review: the parts were not split while dynamo traced).
        mine, theirs = params(), params()

        def clip(ps, grads):  # the gradients set inside: dynamo takes wrapper-subclass inputs then
            for p, g in zip(ps, grads):
                p.grad = g
            fastclip.clip_grads_with_norm_(ps, 1.0, 13.0)

        grads = [p.grad for p in mine]
        for p in mine:
            p.grad = None
        torch._dynamo.reset()
        torch.compile(clip, backend="eager", fullgraph=True)(mine, grads)
        torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, torch.tensor(13.0))
        same(mine, theirs)


def test_torch_dispatch_subclass_per_tensor_norms_stay_whole():
    """grad_norms of wrapper-subclass gradients: each component's norms,
    next to a plain gradient and one that is None (found in review: the
    per-tensor norms were copied into a plain tensor, which kept one
    component, silently)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    grads = [two_tensor.TwoTensor(torch.full((4,), 1.0), torch.full((4,), 2.0)),
             two_tensor.TwoTensor(torch.full((3,), -3.0), torch.full((3,), 0.5))]
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    for p, g in zip(params, grads):
        p.grad = g
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        for listed, expect_a, expect_b in ((params[:2], [2.0, 27.0**0.5], [4.0, 0.75**0.5]),
                                           (params, [2.0, 27.0**0.5, 0.0], [4.0, 0.75**0.5, 0.0])):
            total, each = fastclip.grad_norms(listed)
            assert isinstance(each, two_tensor.TwoTensor), type(each)
            torch.testing.assert_close(each.a, torch.tensor(expect_a), rtol=1e-6, atol=0)
            torch.testing.assert_close(each.b, torch.tensor(expect_b), rtol=1e-6, atol=0)
            torch.testing.assert_close(total.a, torch.tensor(31.0**0.5), rtol=1e-6, atol=0)

@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_fake_tensors_trace(tracing_mode):
    """make_fx over the in-place functions (fake tensors, symbolic sizes)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(w, g):
        w.grad = g
        fastclip.clip_grad_value_([w], 0.5)
        total = fastclip.clip_grad_norm_([w], 0.4)
        return w.grad * 1.0, total

    graph = make_fx(step, tracing_mode=tracing_mode)(torch.zeros(5, requires_grad=True), torch.ones(5))
    grad, total = graph(torch.zeros(5, requires_grad=True), torch.linspace(-2.0, 2.0, 5))
    assert float(total) == 1.0  # the norm of the clamped gradient
    expected = torch.tensor([-0.5, -0.5, 0.0, 0.5, 0.5]) * (0.4 / (1.0 + 1e-6))
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:fastclip. computing with plain PyTorch")
def test_write_probe_runs_once_per_dtype_and_device(monkeypatch):
    """Whether torch can write a dtype is probed on a one-element tensor
    once per process, not on every split-path call (found in review: on a
    GPU each probe waits for the device)."""
    monkeypatch.setattr(_fallback, "_PROBED", {})
    probes = []
    real = _fallback.multi_tensor_scale_

    def scale(tensors, coef):
        if len(tensors) == 1 and tensors[0].numel() == 1 and not tensors[0].any():
            probes.append(tensors[0].dtype)
        return real(tensors, coef)

    monkeypatch.setattr(_fallback, "multi_tensor_scale_", scale)
    params = make_params([torch.full((3,), 4.0), torch.full((2,), 3.0 + 0j, dtype=torch.complex64)])
    for _ in range(3):
        fastclip.clip_grad_norm_(params, 0.5)
    assert probes == [torch.complex64], probes
    # The verdict for a dtype torch cannot write is kept too.
    ints = [torch.zeros(2, dtype=torch.int32)]
    assert _fallback.first_unsupported(ints, "mul_")[0] == 0
    assert _fallback.first_unsupported(ints, "mul_")[0] == 0
    assert probes == [torch.complex64, torch.int32], probes


def test_missing_extension_is_reported_as_missing(tmp_path):
    # The package without its compiled module, imported in a fresh process:
    # backend() says the module is missing (found in review: `from . import
    # _C` reported a circular import of the package instead).
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    package = Path(fastclip.__file__).parent
    shutil.copytree(package, tmp_path / "fastclip", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    out = subprocess.run(
        # Without an editable install's finder, which would find the built module elsewhere.
        [sys.executable, "-c", "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
         "getattr(f, '__module__', '') + getattr(f, '__name__', '')]; import fastclip; print(fastclip.backend())"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "No module named 'fastclip._C'" in out.stdout, out.stdout
    assert "circular" not in out.stdout


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "[1]", "[1,1]"])
def test_fallback_scale_takes_every_coefficient_shape_the_op_takes(shape):
    # A one-element coefficient of any shape, as the op (found in review: a
    # [1, 1] one broadcast a 1-d gradient to [1, n], which mul_ refused).
    grads = make_grads([(5,), (2, 3)], [torch.float32, torch.bfloat16], seed=9)
    ours, theirs = [g.clone() for g in grads], [g.clone() for g in grads]
    coef = torch.full(shape, 0.3, dtype=torch.float64)
    _ops.multi_tensor_scale_(ours, coef)
    _fallback.multi_tensor_scale_(theirs, coef)
    for a, b in zip(ours, theirs):
        assert_same_bits(a, b)


@pytest.fixture(params=["no_extension", "complex"])
def fallback_route(request, monkeypatch):
    """How a list reaches the fallback: the extension missing (values as
    given), or loaded with the gradients complex (values as the real parts:
    the same norms)."""
    monkeypatch.setattr(fastclip.clip, "_warned", set())
    if request.param == "complex":
        if not _ops.available():
            pytest.skip("the extension is not loaded")
        return lambda t: t.to(torch.complex128 if t.dtype == torch.float64 else torch.complex64)
    request.getfixturevalue("fallback")
    return lambda t: t


@pytest.mark.parametrize(
    "values, dtype, ord",
    [([1.47e-27, 1.3e-27], torch.float32, 12.0), ([4e-4, 3e-4, 5e-4], torch.float32, 100.0),
     ([1e-160, 2e-160], torch.float64, 2.0)],
    ids=["fp32_1e-27_ord12", "fp32_4e-4_ord100", "fp64_1e-160_ord2"],
)
def test_fallback_rescues_power_sums_in_the_subnormal_range(values, dtype, ord, fallback_route):
    # Found in review: a power sum below 2^-960 that lost digits to
    # subnormals without coming out below max |x| was kept (2.2e-3 off at
    # order 12; the kernels rescue such sums).
    grads = [fallback_route(torch.tensor(values, dtype=dtype))]
    norm = ref_norm(grads, ord)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (the float32 result of 2.2e-160 is 0)
        torch.testing.assert_close(fastclip.get_total_norm(grads, ord), norm.float(), rtol=2**-23, atol=0)
        total, _ = _fallback.multi_tensor_norm(grads, ord, False, fp64=True)
    torch.testing.assert_close(total, norm, rtol=1e-13, atol=0)


@pytest.mark.parametrize("n, value, ord", [(2000, 1e-300, 0.01), (2, 1e-319, 1 / 1030)], ids=["2000x1e-300", "2x1e-319"])
def test_fallback_combination_below_order_1_does_not_overflow(n, value, ord, fallback):
    # Found in review: the per-tensor norms divided by the largest, summed
    # and raised to 1/p overflowed (inf) where the norm is finite.
    grads = [torch.tensor([value], dtype=torch.float64) for _ in range(n)]
    expected = math.exp(math.log(n) / ord + math.log(value))
    with pytest.warns(UserWarning, match="fastclip"):
        assert_norm_close(fastclip.get_total_norm(grads, ord), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(_fallback.combine(torch.full((n,), value, dtype=torch.float64), ord).item(),
                               expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("route", ["complex", "mixed_parts"])
def test_small_order_keeps_a_norm_under_the_double_range_of_the_largest(route):
    """At order 0.01 a norm of 1e-300 next to one of 1 adds 1e-3 to the sum
    of powers: the split path's combination kept it (found in review: the
    ratio 1e-300 / 1.27e30 vanished, a norm 4.9% low; the kernels were right)."""
    big, tiny = torch.ones(2, dtype=torch.complex128), torch.tensor([1e-300], dtype=torch.complex128)
    if route == "mixed_parts":
        big = big.real.contiguous()  # float64: the kernels' part, next to the complex one
    expected = math.exp(math.log(2 + 1e-300**0.01) / 0.01)  # 1.3326e30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice
        total = fastclip.get_total_norm([big, tiny], 0.01)
    assert total.item() == pytest.approx(expected, rel=2**-23)
    torch.testing.assert_close(_fallback.combine(torch.tensor([1.0, 1e-300], dtype=torch.float64), 0.01).item(),
                               math.exp(math.log(1 + 1e-300**0.01) / 0.01), rtol=1e-12, atol=0)


def test_fallback_norms_refuse_a_gradient_beyond_its_storage(fallback_route):
    # Found in review: the norm functions read past the memory of a
    # gradient whose storage was shrunk under it (NaN, or a crash), where
    # the ops refuse it; nothing is read then.
    params = make_params([fallback_route(torch.full((3,), 4.0)), fallback_route(torch.ones(1000))])
    dense, short = _grads(params)
    short.untyped_storage().resize_(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"gradient 1 .*beyond the memory of its storage"):
            fastclip.get_total_norm([dense, short])
        with pytest.raises(RuntimeError, match="beyond the memory of its storage"):
            fastclip.grad_norms(params)


def test_fallback_warning_is_given_when_only_compiled_code_runs(fallback):
    # Found in review: the warning was skipped while dynamo traced, so a
    # program calling fastclip only under torch.compile never got it. It
    # is given once, at trace time.
    torch._dynamo.reset()
    params = _params(torch.float32, seed=11)
    compiled = torch.compile(lambda ps: fastclip.clip_grad_norm_(ps, 1.0), backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled(params)
        compiled(params)
    found = _fastclip_warnings(record)
    assert len(found) == 1 and "could not be loaded" in str(found[0].message), [str(w.message) for w in record]
    assert found[0].filename == __file__, found[0].filename  # attributed to the caller


def test_fallback_error_if_nonfinite_under_fullgraph_compile(fallback):
    # Found in review: the split path read the norm on the host, which
    # fullgraph=True refuses (a data-dependent guard); the graph checks it
    # now, with torch's message, before anything is written.
    torch._dynamo.reset()
    params = _params(torch.float32, seed=12)
    expected = clone_params(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norm = fastclip.clip_grad_norm_(expected, 1.0, error_if_nonfinite=True)
        compiled = torch.compile(lambda ps: fastclip.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True),
                                 backend="aot_eager", fullgraph=True)
        assert_identical(compiled(params), norm)
        for p, q in zip(_grads(params), _grads(expected)):
            assert_identical(p, q)
        params[0].grad[0] = math.inf
        before = [g.clone() for g in _grads(params)]
        with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
            compiled(params)
    for g, b in zip(_grads(params), before):
        assert_identical(g, b)


@pytest.mark.parametrize("ord, magnitude, lift", [(2.0, 1e-150, 2.0**600), (1.0, 1e-295, 2.0**900)],
                         ids=["ord2_1e-150", "ord1_1e-295"])
def test_fallback_rescue_of_orders_1_and_2_scales_by_a_power_of_two(ord, magnitude, lift):
    # Found in review: the rescue divided by max |x| itself, a rounding the
    # kernels' power of two does not add (121 of 300 float64 norms of
    # values near 1e-150 changed). Scaled by a power of two, the norm has
    # the bits of the norm of the values lifted into the normal range.
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        values = torch.rand(37, generator=gen, dtype=torch.float64) * magnitude
        total, _ = _fallback.multi_tensor_norm([values], ord, False, fp64=True)
        assert_same_bits(total, torch.linalg.vector_norm(values * lift, ord) / lift)


def test_forward_mode_ad_through_the_norm_like_torch():
    # Found in review: the storage check of the fallback's norms failed on
    # torch.func's wrapped tensors (gradients with tangents go there).
    x, t = torch.randn(5), torch.randn(5)
    ours = torch.func.jvp(lambda a: fastclip.get_total_norm([a, a * 2]), (x,), (t,))
    theirs = torch.func.jvp(lambda a: torch.nn.utils.get_total_norm([a, a * 2], foreach=False), (x,), (t,))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_vmap_through_the_fallback_norm(fallback):
    x = torch.randn(4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = torch.vmap(lambda a: fastclip.get_total_norm([a, a * 2], 3.0))(x)
    expected = torch.stack([ref_norm([row, row * 2], 3.0) for row in x]).float()
    torch.testing.assert_close(batched, expected, rtol=1e-6, atol=0)


def test_fallback_warning_as_an_error_raises_on_every_call(fallback):
    # Found in review: the reason was marked as warned before the warning,
    # so under warnings.simplefilter("error") only the first call raised.
    params = _params(torch.float32, seed=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with pytest.raises(UserWarning, match="fastclip"):
                fastclip.get_total_norm(_grads(params))
