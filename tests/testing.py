"""Shared test helpers: devices, dtypes with their tolerances, the float64
reference, gradient factories and poisoning.

Every comparison in the suite goes through ``assert_norm_close`` or
``assert_scaled_close`` so that a tolerance lives in exactly one place (the
``TOLERANCES`` table) and the negative controls in ``test_ops.py`` exercise
the same code the real checks use.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import pytest
import torch
from torch import Tensor

from fastclip import _ops

# ------------------------------------------------------------------ devices
HAS_CUDA = torch.cuda.is_available()

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# For parametrize: CUDA cases are always collected and skipped without a GPU,
# so a CPU-only run shows that they exist.
DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]


def available_memory_bytes() -> int:
    """The host memory the kernel says is available (MemAvailable), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def require_kernel(device: str) -> None:
    """Skip an op-level test on a device the extension has no kernel for."""
    if not _ops.has_kernel(device):
        pytest.skip(f"this build of fastclip has no {device} kernels")


# ------------------------------------------------------------------- dtypes
@dataclass(frozen=True)
class Tol:
    """Tolerances for one gradient dtype.

    norm_rtol: the returned norm (always float32, computed in float64) against
        the float64 reference: one float32 ulp at the bottom of a binade
        (2**-23 relative). A norm computed in float64 and rounded once is
        within half an ulp (2**-24), whatever the summation order; a lost
        digit or a sum in float32 is not. The same for every dtype because
        the norm is float32 for every dtype.
    scale_rtol, scale_atol: fp64 gradients against the float64 product:
        2**-43 (1.1e-13), for the clip, whose coefficient comes from the
        kernel's own float64 norm: another summation order moves a sum of
        75,645 fp64 squares by up to ~1e-14 relative, and for a general
        order p the pow() calls add a few ulps; a coefficient rounded to
        float32 would be off by ~1e-8.
        The other dtypes are compared bitwise (see assert_scaled_close).
    """

    norm_rtol: float
    scale_rtol: float
    scale_atol: float


def _ulp_atol(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny * info.eps  # spacing of the subnormals


NORM_RTOL = 2.0**-23
# complex64 gradients (fallback only): torch's complex product, against the
# complex128 one.
COMPLEX_SCALE_RTOL = 2.0**-22
FP64_SCALE_RTOL = 2.0**-43

TOLERANCES = {
    torch.float32: Tol(norm_rtol=NORM_RTOL, scale_rtol=0.0, scale_atol=0.0),
    torch.float64: Tol(norm_rtol=NORM_RTOL, scale_rtol=FP64_SCALE_RTOL, scale_atol=_ulp_atol(torch.float64)),
    torch.float16: Tol(norm_rtol=NORM_RTOL, scale_rtol=0.0, scale_atol=0.0),
    torch.bfloat16: Tol(norm_rtol=NORM_RTOL, scale_rtol=0.0, scale_atol=0.0),
}

DTYPES = list(TOLERANCES)
LOW_PRECISION = (torch.float16, torch.bfloat16)

ORDS = [2.0, 1.0, math.inf, 3.5]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def ord_id(ord: float) -> str:
    return f"ord={ord:g}"


# ---------------------------------------------------------------- reference
def _as_real64(t: Tensor) -> Tensor:
    """The values of ``t`` as a flat float64 vector (sparse densified, complex as |z|)."""
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.detach().to("cpu")
    if t.is_complex():
        return t.to(torch.complex128).abs().flatten()
    return t.to(torch.float64).flatten()


def _sum_norm(values: Tensor, ord: float) -> Tensor:
    """The ord-norm of finite float64 values through torch.sum's cascade
    summation: vector_norm's CPU kernel adds term after term (found in
    review: up to 7.6e-13 relative on 65,563 equal values, beyond the fp64
    tolerance of 2^-43; the cascade sum is within 1e-15)."""
    x = values.abs()
    if math.isinf(ord):
        return x.max()
    if ord == 1.0:
        return x.sum()
    if ord == 2.0:
        return x.square().sum().sqrt()  # correctly rounded, where a 0-dim pow(0.5) was not always
    return x.pow(ord).sum().pow(1.0 / ord)


def _norm64(values: Tensor, ord: float) -> Tensor:
    """The norm in float64 of the values divided by a scale, times the
    scale, so that data near the ends of the double range neither overflows
    nor underflows (p < 1: unscaled where that stays finite). For p = 1, 2
    and inf the scale is a power of two (exact:
    still the plain torch formula); for a general p it is max |x| itself, so
    that the largest term is exactly 1 and no order underflows it (a power
    of two leaves it in [0.5, 1), and 0.5**1100 is below the smallest double)."""
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    amax = values.abs().max()
    if not (torch.isfinite(amax) and amax > 0):
        return torch.linalg.vector_norm(values, ord)
    if ord < 1.0:
        # |x|**p with p < 1 neither overflows nor underflows where |x| does
        # not, and dividing by max |x| could underflow a tiny |x| whose
        # small power still matters: plain, unless the sum overflows.
        plain = _sum_norm(values, ord)
        if torch.isfinite(plain):
            return plain
    exact = ord in (1.0, 2.0) or math.isinf(ord)
    # 2**(e - 1) puts max |x| in [1, 2): 2**e itself is not a double when
    # max |x| >= 2**1023.
    scale = math.ldexp(1.0, math.frexp(amax.item())[1] - 1) if exact else amax.item()
    return _sum_norm(values / scale, ord) * scale


def ref_norm(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """Norm of all ``tensors`` seen as one vector: float64, 0-dim, on the CPU."""
    flat = [_as_real64(t) for t in tensors]
    values = torch.cat(flat) if flat else torch.zeros((0,), dtype=torch.float64)
    return _norm64(values, ord)


def ref_norms_each(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """Norm of each tensor: float64 vector on the CPU."""
    if not tensors:
        return torch.zeros((0,), dtype=torch.float64)
    return torch.stack([_norm64(_as_real64(t), ord) for t in tensors])


def ref_coef(max_norm: float, norm: Tensor) -> Tensor:
    """torch's clip coefficient min(1, max_norm / (norm + 1e-6)), in float64."""
    return torch.clamp(max_norm / (norm.to(torch.float64) + 1e-6), max=1.0)


FLOAT_MIN_NORMAL = 2.0**-126  # below it the kernels scale float-computed data in double


def ref_scaled(t: Tensor, coef: Union[Tensor, float]) -> Tensor:
    """``t * coef`` as the dtype should hold it (torch's opmath, as the
    kernels compute it): fp32 and 16-bit the float32 product by the
    coefficient rounded to float32, rounded to the dtype, or, for a
    coefficient below float32's normal range, the float64 product rounded
    to float32, then to the dtype; fp64 the float64 product; complex the
    complex128 product."""
    coef = torch.as_tensor(coef, dtype=torch.float64)
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.detach().to("cpu")
    if t.dtype in LOW_PRECISION or t.dtype == torch.float32:
        if 0.0 < abs(float(coef)) < FLOAT_MIN_NORMAL:
            return (t.double() * coef).float().to(t.dtype)
        return (t.float() * coef.float()).to(t.dtype)
    if t.is_complex():
        return t.to(torch.complex128) * coef
    return t.to(torch.float64) * coef


# --------------------------------------------------------------- comparison
def assert_norm_close(actual: Tensor, expected: Tensor, dtype: torch.dtype = torch.float32, atol: float = 0.0) -> None:
    """A float32 norm from fastclip against a float64 reference."""
    assert actual.dtype == torch.float32, f"norm dtype is {actual.dtype}, expected float32"
    torch.testing.assert_close(
        actual.detach().cpu().to(torch.float64),
        expected.detach().cpu().to(torch.float64),
        rtol=TOLERANCES[dtype].norm_rtol,
        atol=atol,
        equal_nan=True,
    )


def assert_scaled_close(actual: Tensor, expected: Tensor, rtol: float = 0.0) -> None:
    """A scaled tensor against ``ref_scaled`` output: bitwise for fp32 and
    16-bit (NaN matching any NaN), or within ``rtol`` where the caller says
    why the coefficient itself is less exact; fp64 within TOLERANCES
    (2**-43 relative: the clip's coefficient comes from the kernel's own
    float64 norm, whose summation order differs); complex (the plain-PyTorch fallback's) within float32
    rounding."""
    if actual.layout != torch.strided:
        actual = actual.to_dense()
    if expected.layout != torch.strided:
        expected = expected.to_dense()
    # Both on the CPU (found in review: a CUDA `expected` met the CPU
    # `actual` in torch.equal, which refuses two devices).
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape
    if actual.is_complex():
        torch.testing.assert_close(actual.to(torch.complex128), expected.to(torch.complex128),
                                   rtol=COMPLEX_SCALE_RTOL, atol=0.0, equal_nan=True)
    elif actual.dtype == torch.float64:
        tol = TOLERANCES[torch.float64]
        torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol.scale_rtol, atol=tol.scale_atol,
                                   equal_nan=True)
    elif rtol > 0.0:
        torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=0.0, equal_nan=True)
    else:
        assert_identical(actual, expected.to(actual.dtype))


def assert_same_bits(a: Tensor, b: Tensor) -> None:
    """Bit-identical (NaN payloads included), of the same dtype and shape
    (strides may differ)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.numel() == 0:
        return
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    # Compared where both are (found in review: GiBs of GPU data went to
    # pageable host memory); on the CPU when their devices differ.
    if a.device != b.device:
        a, b = a.cpu(), b.cpu()
    ab = a.detach().contiguous().view(ints)
    bb = b.detach().contiguous().view(ints)
    assert torch.equal(ab, bb), "tensors differ bit-wise"


def assert_identical(a: Tensor, b: Tensor) -> None:
    """Bit-identical except that any NaN matches any NaN (torch's own kernels
    do not preserve NaN payloads: its bf16 clamp turns 0x7FC0 into 0xFFFF)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.device != b.device:
        a, b = a.cpu(), b.cpu()
    a_nan, b_nan = torch.isnan(a), torch.isnan(b)
    assert torch.equal(a_nan, b_nan), "NaN positions differ"
    assert_same_bits(torch.where(a_nan, torch.zeros_like(a), a), torch.where(b_nan, torch.zeros_like(b), b))


# ------------------------------------------------------------- factories
DTypeSpec = Union[torch.dtype, Sequence[torch.dtype]]


def make_grads(
    shapes: Sequence[Sequence[int]],
    dtype: DTypeSpec = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    scale: float = 1.0,
) -> list[Tensor]:
    """One randn tensor per shape (times ``scale``), reproducible from ``seed``.

    ``dtype`` is one dtype for all, or one per shape. Values are drawn in
    float32 on the CPU and then converted, so the same seed gives the same
    numbers (up to rounding) in every dtype and on every device.
    """
    dtypes = [dtype] * len(shapes) if isinstance(dtype, torch.dtype) else list(dtype)
    assert len(dtypes) == len(shapes)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dt in zip(shapes, dtypes):
        values = torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale
        out.append(values.to(device=device, dtype=dt))
    return out


def make_params(grads: Sequence[Optional[Tensor]]) -> list[torch.nn.Parameter]:
    """Parameters whose ``.grad`` are (clones of) ``grads``; None stays None."""
    params = []
    for g in grads:
        if g is None:
            p = torch.nn.Parameter(torch.zeros(3))
        else:
            dense = g.to_dense() if g.layout != torch.strided else g
            p = torch.nn.Parameter(torch.zeros_like(dense))
            p.grad = g.clone()
        params.append(p)
    return params


def clone_params(params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Independent copies (data and grad) for a side-by-side run with torch."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


def snapshot(tensors: Sequence[Tensor]) -> list[tuple[Tensor, int]]:
    """Copies and version counters, to prove later that nothing was written."""
    return [(t.detach().clone(), t._version) for t in tensors]


def assert_untouched(tensors: Sequence[Tensor], before: list[tuple[Tensor, int]]) -> None:
    assert len(tensors) == len(before)
    for i, (t, (copy, version)) in enumerate(zip(tensors, before)):
        assert t._version == version, f"tensors[{i}]._version changed from {version} to {t._version}"
        if t.layout == torch.strided:
            assert_same_bits(t, copy)
        else:
            assert_same_bits(t.to_dense(), copy.to_dense())


# ---------------------------------------------------------------- poison
def poison(*tensors: Tensor) -> None:
    """Fill ``tensors`` with NaN in place.

    Used on memory an op must neither read nor write (the gaps of a strided
    view, the element before an offset view): a read shows up as a NaN norm,
    a write as lost NaN bits.
    """
    for t in tensors:
        t.fill_(float("nan"))


@contextlib.contextmanager
def uninitialized_memory_as_nan():
    """torch.empty, and the ops' at::empty outputs, filled with NaN (torch's
    deterministic mode, warnings only): an output element an op forgets to
    write reads as NaN. poison_allocator alone misses small CPU blocks, whose
    first bytes the allocator's bookkeeping overwrites."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def poison_allocator(numels: Sequence[int], device: str = "cpu") -> None:
    """Fill, then free, float32 blocks of these sizes before an op allocates
    its outputs: allocators hand freed blocks of the same size back first, so
    an output element the op forgets to write reads as NaN, not a lucky 0
    (large blocks; see uninitialized_memory_as_nan for the rest)."""
    blocks = [torch.full((n,), float("nan"), dtype=torch.float32, device=device) for n in numels]
    del blocks


def gapped_view(shape: tuple[int, int], dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> Tensor:
    """x[:, ::2] of a NaN-poisoned base: every other column is a gap that must
    stay NaN and must not reach a norm."""
    rows, cols = shape
    base = torch.empty((rows, 2 * cols), dtype=dtype, device=device)
    poison(base)
    view = base[:, ::2]
    view.copy_(make_grads([(rows, cols)], dtype, device, seed)[0])
    return view


def offset_view(numel: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> Tensor:
    """buf[1:] of a buffer whose element 0 is NaN: data at an odd element
    offset (misaligned for any vector width), the element before it poisoned."""
    buf = torch.empty((numel + 1,), dtype=dtype, device=device)
    poison(buf[:1])
    buf[1:].copy_(make_grads([(numel,)], dtype, device, seed)[0])
    return buf[1:]


def gaps_of(view: Tensor) -> Tensor:
    """The memory of a ``gapped_view``/``offset_view`` base outside the view."""
    base = view._base
    assert base is not None
    if base.dim() == 2:
        return base[:, 1::2]
    return base[:1]


def filled(shapes, value, dtype):
    """Tensors of +-value (alternating sign per tensor): overflow/underflow inputs."""
    return [torch.full(s, value, dtype=dtype) * (-1) ** i for i, s in enumerate(shapes)]


def check_norm_paths(fastclip, grads, params, ord):
    """get_total_norm (expecting the fallback warning), grad_norms and
    clip_grad_norm_ all agree with the float64 reference."""
    import pytest

    norm = ref_norm(grads, ord)
    with pytest.warns(UserWarning, match="fastclip"):
        assert_norm_close(fastclip.get_total_norm(grads, ord), norm)
    _, each = fastclip.grad_norms(params, ord)
    assert_norm_close(each, ref_norms_each(grads, ord))
    assert_norm_close(fastclip.clip_grad_norm_(params, 0.5 * norm.item(), ord), norm)


# ------------------------------------------------------ clip_scalars_ cases
CLIP_SCALARS_NORMS = [0.0, 5e-324, 1e-300, 0.5, 3.0, 1e30, 3.5e38, 1e300, math.inf, math.nan]
CLIP_SCALARS_SCALES = [None, (65536.0, torch.float32), (1e-30, torch.float64), (2.0, torch.bfloat16),
                       (0.5, torch.float16), (0.0, torch.float32), (-4.0, torch.float64), (math.inf, torch.float32)]
CLIP_SCALARS_FLAGS = [None, (0.0, torch.float32), (1.0, torch.float32), (math.nan, torch.float32),
                      (2.0, torch.bfloat16), (-1.0, torch.float64)]
CLIP_SCALARS_MAX_NORMS = [0.0, 1e-3, 1.0, 1e38]


def clip_scalars_cases(count: int = 400, seed: int = 0) -> list[dict]:
    """Argument sets of ``fastclip::clip_scalars_`` (without the logs): norms
    of either dtype from 0 and subnormal to beyond float32's range, NaN and
    inf; loss and extra scales of every dtype, 0, negative and inf; flags 0,
    1, NaN, negative; every max_norm and switch; random, with a fixed seed,
    after the combinations listed first."""
    rng = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=rng))]

    def scalar(spec):
        return None if spec is None else torch.tensor(spec[0], dtype=spec[1])

    listed = [
        dict(norm=3.0, loss_scale=None, extra_scale=None, found_inf=None, extra_found=None, max_norm=1.0),
        dict(norm=0.5, loss_scale=None, extra_scale=None, found_inf=None, extra_found=None, max_norm=1.0),
        dict(norm=1e300, loss_scale=None, extra_scale=None, found_inf=None, extra_found=None, max_norm=1e-3),
        dict(norm=math.nan, loss_scale=None, extra_scale=None, found_inf=None, extra_found=None, max_norm=1.0),
        dict(norm=3.0, loss_scale=(65536.0, torch.float32), extra_scale=(4.0, torch.float32),
             found_inf=(0.0, torch.float32), extra_found=(1.0, torch.float32), max_norm=1.0),
    ]
    cases = []
    for k in range(count):
        spec = listed[k] if k < len(listed) else dict(
            norm=pick(CLIP_SCALARS_NORMS), loss_scale=pick(CLIP_SCALARS_SCALES), extra_scale=pick(CLIP_SCALARS_SCALES),
            found_inf=pick(CLIP_SCALARS_FLAGS), extra_found=pick(CLIP_SCALARS_FLAGS),
            max_norm=pick(CLIP_SCALARS_MAX_NORMS))
        cases.append(dict(
            norm=torch.tensor(spec["norm"], dtype=pick([torch.float64, torch.float32]) if k >= len(listed)
                              else torch.float64),
            max_norm=spec["max_norm"],
            loss_scale=scalar(spec["loss_scale"]), extra_scale=scalar(spec["extra_scale"]),
            found_inf=scalar(spec["found_inf"]), extra_found=scalar(spec["extra_found"]),
            skip_inf_divisor=k % 2 == 0, count_skip=k % 3 != 0,
        ))
    return cases


def run_clip_scalars(fn, case: dict, skipped_before: int = 7) -> dict:
    """``fn`` (an implementation of clip_scalars_) on ``case`` with poisoned
    logs; everything it returned and wrote."""
    last_norm = torch.full((), math.nan)
    last_coef = torch.full((), math.nan)
    skipped = torch.tensor(skipped_before, dtype=torch.int64)
    factor, divisor, found = fn(
        case["norm"], case["max_norm"], case["loss_scale"], case["extra_scale"], case["found_inf"],
        case["extra_found"], case["skip_inf_divisor"], last_norm, last_coef, skipped, case["count_skip"])
    return dict(factor=factor, divisor=divisor, found=found, last_norm=last_norm, last_coef=last_coef,
                skipped=skipped)
