"""The ops in plain PyTorch, for what the kernels do not cover.

Used when the extension cannot be loaded, for devices it has no kernel for,
and for sparse or complex gradients. Same contract as ``torch.ops.fastclip``
(float32 norms accumulated in float64, coefficient from the float64 norm),
one tensor at a time.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode


def has_tangent(t: Tensor) -> bool:
    """``t`` carries a forward-mode AD tangent (inside ``forward_ad.dual_level``,
    the only place where tensors have one), or, under torch.vmap, the value
    it batches does (jvp of a vmap: the ops' batching rules would hand the
    duals to the ops). The kernels do not propagate tangents; plain PyTorch
    does, as torch's foreach=False functions."""
    if _forward_ad._current_level < 0 or torch.compiler.is_compiling():
        return False
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return _forward_ad.unpack_dual(t).tangent is not None


def _dense_values(t: Tensor) -> Tensor:
    """The stored values whose norm is the tensor's norm."""
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()  # duplicates add up before the norm
    if t.layout != torch.strided:
        return t.values()  # compressed layouts store no duplicates
    return t


# kRescueSmallOrder in csrc/numerics.h.
RESCUE_SMALL_ORDER = 2.0**-20
# log2 of kRescueTiny there, and the range of rescue_scale's powers of two.
RESCUE_TINY_LOG2 = -960.0
RESCUE_MIN_EXP, RESCUE_MAX_EXP = -1022, 1023


def _norm64(t: Tensor, ord: float) -> Tensor:
    values = _dense_values(t)
    if values.is_complex():
        # |z| in double: complex64's abs() would round every magnitude to float32.
        values = values.to(torch.complex128).abs()
    elif values.is_floating_point() and values.element_size() == 1:
        # float8 (torch has no norm for it, nor a promotion to double): exact
        # in float32, its squares too (found in review).
        values = values.to(torch.float32)
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=t.device)  # torch's inf-norm refuses empty tensors
    if has_tangent(values):
        # vector_norm's tangent is summed in the values' dtype: bf16
        # tangents of the float32 norm came out 1% off (the primal is
        # accumulated in float64 either way).
        values = values.to(torch.float64)
    norm = torch.linalg.vector_norm(values, ord, dtype=torch.float64)
    if ord in (1.0, 2.0, math.inf) and values.dtype != torch.float64:
        return norm  # squares of finite 32/16-bit values stay inside the double range
    # The rescue of the kernels, without a host sync: where the power sum
    # overflowed or underflowed, or always for an order below
    # RESCUE_SMALL_ORDER (as csrc/numerics.h: there a single value's norm
    # came out wrong, above it as well as below; found in review), take the
    # norm of the values divided by max |x|.
    # A power sum below 2^-960 (kRescueTiny) may have lost digits to
    # subnormals, even where the norm is not below max |x| (found in review:
    # [1.47e-27, 1.3e-27] at order 12 came out 2.2e-3 off; the kernels
    # rescue such sums).
    top = torch.linalg.vector_norm(values, math.inf, dtype=torch.float64)
    tiny = torch.log2(norm) * ord < RESCUE_TINY_LOG2
    rescue = torch.isfinite(top) & (top > 0) & (torch.isinf(norm) | (norm < top) | tiny | (ord < RESCUE_SMALL_ORDER))
    scale = torch.where(rescue, _rescue_scale(top, ord), torch.ones_like(top))
    return torch.where(rescue, _scaled_norm(values.to(torch.float64), scale, ord), norm)


def _rescue_scale(top: Tensor, ord: float) -> Tensor:
    """rescue_scale in csrc/numerics.h: for orders 1 and 2 the power of two
    at max |x| (dividing by it is exact; found in review: dividing float64
    data by max |x| itself added a rounding, 121 of 300 norms of values near
    1e-150 changed), else max |x|; never below the smallest normal double."""
    if ord in (1.0, 2.0):
        exponent = torch.frexp(top).exponent.clamp(RESCUE_MIN_EXP, RESCUE_MAX_EXP)
        return torch.ldexp(torch.ones_like(top), exponent)
    return top.clamp_min(torch.finfo(torch.float64).tiny)


def _scaled_norm(values: Tensor, scale: Tensor, ord: float, dim: Optional[int] = None) -> Tensor:
    """``vector_norm(values / scale) * scale`` (float64, ``scale`` > 0 and at
    least max |values|). Below order 1 with ``ratio_pow`` and ``root``: a
    ratio under the double range still counts, and the root of the scaled
    sum (at most the element count) may overflow where the norm does not
    (found in review: 2,000 norms of 1e-300 at order 0.01 gave inf, not
    1.27e30, and 1e-300 next to 1 was dropped, a norm 4.9% low). Along
    ``dim`` (``scale`` then keeps that dimension), or over all values."""
    if dim is None:
        if ord >= 1.0:
            return torch.linalg.vector_norm(values / scale, ord) * scale
        return root(scale, ratio_pow(values.abs(), scale, ord).sum(), ord)
    if ord >= 1.0:
        norm = torch.linalg.vector_norm(values / scale, ord, dim=dim, keepdim=True) * scale
    else:
        norm = root(scale, ratio_pow(values.abs(), scale, ord).sum(dim=dim, keepdim=True), ord)
    return norm.squeeze(dim)


# Ratios below this may have lost bits in the subnormal range, or vanished;
# their powers are taken in logarithms.
RATIO_TINY = 2.0**-1000


def ratio_pow(values: Tensor, scale: Tensor, ord: float) -> Tensor:
    """``(values / scale) ** ord`` of ``values`` >= 0, 0 where the scale is
    not positive. At a small order the power of a ratio below the double
    range is not negligible: such ratios are taken in logarithms."""
    ratio = torch.where(scale > 0, values / scale, torch.zeros_like(values))
    tiny = (ratio < RATIO_TINY) & (values > 0) & torch.isfinite(scale)
    # 0 ** ord is taken as 0 apart: its derivative (inf below order 1) made
    # a forward-mode tangent NaN (found in review; vector_norm gives 0).
    zero = ratio == 0
    powers = torch.where(zero, torch.zeros_like(ratio), torch.where(zero, torch.ones_like(ratio), ratio).pow(ord))
    return torch.where(tiny, torch.exp(ord * (torch.log(values) - torch.log(scale))), powers)


def root(scale: Tensor, sums: Tensor, ord: float) -> Tensor:
    """``scale * sums ** (1 / ord)``, a non-finite scale passed through as
    is; in logarithms where the root alone overflows (an order below 1 over
    many terms) and the product may not."""
    power = sums.pow(1.0 / ord)
    big = torch.isinf(power) & torch.isfinite(sums) & (scale > 0) & torch.isfinite(scale)
    in_logs = torch.exp(torch.log(scale) + torch.log(sums) / ord)
    return torch.where(big, in_logs, torch.where(torch.isfinite(scale), scale * power, scale))


def first_beyond_storage(tensors: list[Tensor]) -> Optional[int]:
    """The index of the first dense tensor with elements beyond its
    storage's memory (resized or freed under it), or None."""
    for k, t in enumerate(tensors):
        if t.layout != torch.strided or t.numel() == 0 or t.device.type == "meta":
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            continue  # no storage to ask (found in review: torch.func.jvp and vmap failed on it)
        last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        if (last + 1) * t.element_size() > t.untyped_storage().nbytes():
            return k
    return None


def combine(norms: Tensor, ord: float, dim: Optional[int] = None) -> Tensor:
    """The ord-norm of float64 norms, all of them or along ``dim`` (one
    per sample under torch.vmap), safe from overflow."""
    top = torch.linalg.vector_norm(norms, math.inf, dim=dim, keepdim=dim is not None)
    scale = torch.where(torch.isfinite(top) & (top > 0), top, torch.ones_like(top))  # no host sync
    return _scaled_norm(norms, scale, ord, dim)


def norms64(tensors: list[Tensor], ord: float) -> tuple[Tensor, Tensor]:
    """Total and per-tensor norms in float64 (the split path combines these)."""
    each = torch.stack([_norm64(t, ord) for t in tensors])
    return combine(each, ord), each


def check_slices(shapes, slices: int) -> None:
    """multi_tensor_norm's check of ``slices`` (check_slices in csrc/ops.cpp)
    on the tensors' shapes (a sample's, under torch.vmap)."""
    if slices < 1:
        raise RuntimeError(f"fastclip::multi_tensor_norm: slices must be at least 1, got {slices}")
    for i, shape in enumerate(shapes):
        if slices > 1 and (len(shape) < 1 or shape[0] != slices):
            raise RuntimeError(f"fastclip::multi_tensor_norm: tensors[{i}] has shape {list(shape)}, but "
                               f"slices={slices} takes every tensor as that many slices along its first dimension")


def multi_tensor_norm(tensors: list[Tensor], ord: float, per_tensor: bool, fp64: bool = False,
                      slices: int = 1) -> tuple[Tensor, Tensor]:
    check_slices([t.shape for t in tensors], slices)
    if slices > 1:
        tensors = [s for t in tensors for s in t.unbind(0)]
    total, each = norms64(tensors, ord)
    if not per_tensor:
        each = each[:0]
    dtype = torch.float64 if fp64 else torch.float32
    return total.to(dtype), each.to(dtype)


_DOUBLE = (torch.float64, torch.complex128)


def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    # One element of any shape, as the op takes it (found in review: a [1, 1]
    # coefficient broadcast a 1-d tensor to [1, n] and mul_ refused it).
    coef = coef.reshape(())
    wide = _below_float_normals(coef)
    for t in tensors:
        # The kernels' arithmetic: float32 (the coefficient rounded to float32)
        # unless the data is double. A float64 coefficient would make torch
        # multiply a 0-dim tensor in double and round twice.
        if t.dtype in _DOUBLE:
            t.mul_(coef.to(device=t.device, dtype=torch.float64))
        elif wide:  # in double, rounded once, as the kernels (scale_needs_double)
            t.copy_(t.to(torch.complex128 if t.is_complex() else torch.float64) * coef.to(t.device, torch.float64))
        else:
            t.mul_(coef.to(device=t.device, dtype=torch.float32))


_FLOAT_MIN_NORMAL = 2.0**-126


def _below_float_normals(coef: Tensor) -> bool:
    """The kernels' scale_needs_double for a coefficient the host reads for
    free: a plain CPU tensor outside tracing (a GPU one would cost a sync;
    there, and for traced or vmapped ones, float32 arithmetic stays)."""
    if coef.device.type != "cpu" or torch.compiler.is_compiling() or type(coef) is not torch.Tensor:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(coef):
        return False
    value = abs(float(coef))
    return value != 0.0 and value < _FLOAT_MIN_NORMAL


def clip_scalars_(
    norm: Tensor, max_norm: float, loss_scale: Optional[Tensor], extra_scale: Optional[Tensor],
    found_inf: Optional[Tensor], extra_found: Optional[Tensor], skip_inf_divisor: bool,
    last_norm: Tensor, last_coef: Tensor, skipped: Tensor, count_skip: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The op's float64 arithmetic in the same order (``step_scalars`` in
    csrc/numerics.h): absent scales are 1, absent flags 0."""
    def value(t: Optional[Tensor], absent: float) -> Tensor:
        if t is None:
            return torch.full((), absent, dtype=torch.float64, device=norm.device)
        return t.reshape(()).to(norm.device, torch.float64)

    scale = value(loss_scale, 1.0)
    norm64 = norm.reshape(()).to(torch.float64) / scale
    # A true division, as the op (max_norm / tensor is a reciprocal times max_norm in torch).
    # 1 * max_norm, not full_like: dynamo then keeps a float max_norm dynamic.
    coef = torch.clamp(torch.ones_like(norm64) * max_norm / (norm64 + 1e-6), max=1.0)
    divisor = (scale * value(extra_scale, 1.0) / coef).to(torch.float32)
    found = ~torch.isfinite(norm64) | (value(found_inf, 0.0) > 0) | (value(extra_found, 0.0) > 0)
    if skip_inf_divisor:
        found = found | torch.isinf(divisor)
    with torch.no_grad():  # logs, without history, as the op writes them
        last_norm.copy_(norm64)
        last_coef.copy_(coef)
    if count_skip:
        skipped.add_(found.to(torch.int64))
    return coef / scale, divisor, found.to(torch.float32)


# first_unsupported's verdicts per (op, dtype, device), kept for the
# process: a probe on a GPU waits for the device (found in review: it ran
# on every split-path call).
_PROBED: dict = {}


def first_unsupported(tensors: list[Tensor], op: str) -> Optional[tuple[int, str]]:
    """``(k, error)`` for the first tensor whose dtype torch's ``op``
    ("mul_" or "clamp_", as the functions here call it) cannot write on its
    device, tried once per dtype and device on a one-element tensor."""
    # Not kept from a trace or a dispatch mode (a FakeTensorMode's verdicts
    # are about fake tensors).
    traced = torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
    tried = {} if traced else _PROBED.setdefault(op, {})
    for k, t in enumerate(tensors):
        key = (t.dtype, t.device)
        if key not in tried:
            probe = torch.zeros(1, dtype=t.dtype, device=t.device)
            try:
                if op == "mul_":
                    multi_tensor_scale_([probe], torch.tensor(0.5, dtype=torch.float64, device="cpu"))
                else:
                    probe.clamp_(-1.0, 1.0)
                tried[key] = None
            except (RuntimeError, TypeError, NotImplementedError) as e:
                tried[key] = str(e).split("\n")[0]
        if tried[key] is not None:
            return k, tried[key]
    return None


def check_clampable(tensors: list[Tensor], names: list[str]) -> None:
    """Raise before anything is clamped if one tensor cannot be."""
    for t, name in zip(tensors, names):
        if t.is_complex():
            raise TypeError(f"clip_grad_value_: {name} is complex; clamping is not defined for complex values")
        if t.layout == torch.sparse_coo and not t.is_coalesced():
            raise ValueError(
                f"clip_grad_value_: {name} is an uncoalesced sparse tensor; clamping its entries one by one "
                "would not clamp their sums: coalesce it first"
            )


def multi_tensor_clamp_(tensors: list[Tensor], clip_value: float) -> None:
    for t in tensors:
        if t.layout == torch.sparse_coo:
            t._values().clamp_(-clip_value, clip_value)  # coalesced: checked by check_clampable
        elif t.layout != torch.strided:
            t.values().clamp_(-clip_value, clip_value)
        else:
            t.clamp_(-clip_value, clip_value)
