"""Drop-in replacements for ``torch.nn.utils`` gradient clipping.

Every function takes what torch's takes and returns what it returns. The
difference is underneath: one fused kernel call per device instead of a
launch per tensor and dtype, float64 accumulation (no overflow of the sum of
squares, float32-exact norms of bf16/fp16 gradients), and no write at all
when the clip coefficient is 1.

Data flows one way: these functions validate arguments, then hand whole
lists to ``torch.ops.fastclip`` (``_ops``). Lists that one call cannot take
(several devices, sparse or complex tensors, no kernel for the device) are
split: each device gets its own call, tensors the kernels do not cover go to
``_fallback`` (plain PyTorch), and the partial norms are combined on the
first tensor's device, as torch does.

``process_group=`` and DTensor gradients (FSDP2, tensor parallel) take the
same local fused pass and then ``_distributed`` all-reduces a few scalars
per group; see that module.
"""
from __future__ import annotations

import math
import os
import sys
import types
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import Tensor
from torch.nn import Parameter
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext
from torch.utils._python_dispatch import _get_current_dispatch_mode
from typing_extensions import deprecated  # a dependency of torch

from . import _distributed, _fallback, _ops

TensorOrTensors = Union[Tensor, Iterable[Tensor]]
# A checked max_norm: a float, or a value used in tensor arithmetic (see _max_norm).
MaxNorm = Union[float, Tensor, torch.SymFloat]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_KERNEL_DEVICES = frozenset(d for d in ("cpu", "cuda") if _ops.has_kernel(d))
_warned: set = set()
_CPU = torch.device("cpu")

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm", "grad_norms"]


# ----------------------------------------------------------------- checks
def _as_float(value, name: str, what: str) -> float:
    """float(value), or the error float() gives (TypeError for None or a
    complex number, as torch's functions raise; ValueError for a string that
    is no number; OverflowError for an int beyond the double range), naming
    the argument."""
    try:
        return float(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {value!r}") from None
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    except OverflowError:  # an int beyond the double range (torch's error names nothing)
        raise OverflowError(f"{name} must be {what}, got an int too large for a float") from None


def _norm_type(norm_type) -> float:
    what = "a positive number or inf"
    p = _as_float(norm_type, "norm_type", what)
    if not p > 0.0:  # also rejects NaN
        raise ValueError(f"norm_type must be {what}, got {norm_type!r}")
    return p


# A plain float for dynamo: torch 2.6's cannot read sys.float_info's fields.
_DOUBLE_MAX = sys.float_info.max

try:  # torch >= 2.8
    from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true
except ImportError:  # older: every comparison dynamo traces is decided, or stops it
    guard_or_false = guard_or_true = None


def _unreadable(value) -> bool:
    """Whether dynamo is tracing and cannot read ``value``: an unbacked
    symbolic float (a numpy scalar argument, or .item() under
    capture_scalar_outputs), which torch's functions take, where comparing
    it would stop the trace (found in review)."""
    if guard_or_true is None or isinstance(value, Tensor) or not torch.compiler.is_compiling():
        return False
    sign = value >= 0.0
    return guard_or_true(sign) and not guard_or_false(sign)


def _in_range(low: float, value, high: float) -> bool:
    """low <= value <= high (False for NaN); True for a value dynamo cannot
    read, which goes unchecked, as a max_norm tensor does."""
    return _unreadable(value) or low <= value <= high


def _max_norm(max_norm) -> MaxNorm:
    """``max_norm`` checked, as a float. Two kinds stay as they are, for
    the coefficient's tensor arithmetic (torch's way: no host sync, no
    recompilation per value): a symbolic float while dynamo traces
    (checked by comparisons, which become guards), and a one-element real
    tensor the host cannot read for free (on a GPU, or while dynamo
    traces), whose value is not checked."""
    what = "a finite number >= 0"
    if isinstance(max_norm, Tensor):
        if max_norm.is_complex():
            raise TypeError(f"max_norm must be {what} or a real tensor of one element, got a {max_norm.dtype} tensor")
        if max_norm.numel() != 1:
            raise ValueError(f"max_norm must be {what} or a real tensor of one element, got shape {tuple(max_norm.shape)}")
        if torch.compiler.is_compiling() or max_norm.device.type != "cpu":
            return max_norm
    value = max_norm if isinstance(max_norm, torch.SymFloat) else _as_float(max_norm, "max_norm", what)
    # Comparisons, not math.isfinite: dynamo traces them on a symbolic float
    # and guards on them. Against the largest double, not inf: its symbols
    # are assumed finite, so `< inf` held without a guard and a later inf
    # ran the graph unchecked (found in review).
    if not _in_range(0.0, value, _DOUBLE_MAX):  # also rejects NaN
        # A symbolic float cannot be formatted while dynamo traces.
        got = "a value outside that range" if torch.compiler.is_compiling() else repr(max_norm)
        raise ValueError(f"max_norm must be {what}, got {got}")
    return value


def _clip_value(clip_value) -> float:
    what = "a number >= 0"
    value = _as_float(clip_value, "clip_value", what)
    if not _in_range(0.0, value, math.inf):  # also rejects NaN
        raise ValueError(f"clip_value must be {what}, got {clip_value!r}")
    return value


def _total_norm(total_norm) -> Tensor:
    """clip_grads_with_norm_'s total_norm as a real one-element tensor."""
    what = "a real number or a real tensor of one element"
    if isinstance(total_norm, (str, bytes, bytearray)):  # float() would parse it (found in review)
        raise TypeError(f"total_norm must be {what}, got {total_norm!r}")
    if not isinstance(total_norm, Tensor):
        # On the CPU whatever `with torch.device(...)` is active (found in review: a meta default failed).
        value = _as_float(total_norm, "total_norm", what)
        if torch.compiler.is_compiling():
            # 1 * value: dynamo specializes torch.tensor(value), a graph per
            # value (found in review), as for max_norm in _coefficient.
            return torch.ones((), dtype=torch.float64, device="cpu") * value
        return torch.tensor(value, dtype=torch.float64, device="cpu")
    if total_norm.is_complex():
        raise TypeError(f"total_norm must be {what}, got a {total_norm.dtype} tensor")
    if total_norm.numel() != 1:
        raise ValueError(f"total_norm must be {what}, got a tensor of shape {tuple(total_norm.shape)}")
    return total_norm.reshape(())


def _not_a_tensor(items: list, name: str) -> TypeError:
    for i, item in enumerate(items):
        if not isinstance(item, Tensor):
            return TypeError(f"{name}[{i}] is a {type(item).__name__}, not a torch.Tensor")
    return TypeError(f"{name} must hold torch.Tensor objects")


def _as_list(tensors: TensorOrTensors) -> list:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def _held(items: TensorOrTensors, grads: bool, name: str):
    """``items`` (their gradients, when ``grads``) gathered in C++ for the
    fast path: ``held.one_call`` says whether the ops can take them in one
    call, made from C++ by ``held.clip_(...)`` and the like with no Python
    list of the tensors (0.36 ms less per 10,000 tensors). None where the ops must
    be called through torch.ops: no extension, tracing by torch.compile, or
    an active ``__torch_function__`` mode, which must see the op."""
    if not _ops.available() or torch.compiler.is_compiling() or _mode_sees_ops():
        return None
    return _ops.hold(_as_list(items), grads, name)


def _mode_sees_ops() -> bool:
    """A ``__torch_function__`` mode is active other than ``with
    torch.device(...)``'s, which changes factory functions only (found in
    review: under it every call took the torch.ops path, whose errors name
    the op's ``tensors[k]``)."""
    return torch._C._is_torch_function_mode_enabled() and any(
        type(mode) is not DeviceContext for mode in _get_current_function_mode_stack()
    )


def _grads(parameters: TensorOrTensors, held=None) -> tuple[list[Tensor], bool]:
    """The gradients of ``parameters`` that are not None, in order, and
    whether they can all go to one op call (see ``_one_call``); from
    ``held`` when the caller already gathered them."""
    if held is not None:
        return held.tensors(), held.one_call
    params = _as_list(parameters)
    grads = []
    for p in params:  # a plain loop: dynamo cannot trace a walrus in a comprehension
        if not isinstance(p, Tensor):
            raise _not_a_tensor(params, "parameters")
        if p.grad is not None:
            grads.append(p.grad)
    return grads, len(grads) > 0 and _one_call(grads)


def _raise_if_nonfinite(total: Tensor, norm_type: float) -> None:
    message = (
        f"The total norm of order {norm_type} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )
    if torch.compiler.is_compiling() and total.device.type == "cpu":
        # Dynamo cannot branch on the norm's value: the graph checks it
        # before the writes that follow (found in review: the split path
        # failed fullgraph=True with a data-dependent guard). Not on a GPU,
        # where it is a device-side assert that ends the CUDA context (found
        # in review): there the host read breaks the graph, as torch's does.
        torch._assert_async(torch.isfinite(total), message)
    elif not torch.isfinite(total).item():
        raise RuntimeError(message)


# ---------------------------------------------------------------- routing
_PLAIN_DISPATCH = Tensor.__torch_dispatch__


def _python_blocker(tensors: list[Tensor]) -> Optional[str]:
    device = tensors[0].device
    for t in tensors:
        if t.layout != torch.strided:
            return "sparse"
        if t.is_complex():
            return "complex"
        if t.dtype not in _KERNEL_DTYPES:
            return "dtype"
        if t.device != device:
            return "devices"
        if type(t).__torch_dispatch__ is not _PLAIN_DISPATCH:
            # DTensor and other __torch_dispatch__ subclasses, as the C++
            # check (found in review: compiled DTensor lists reached the ops).
            return "subclass"
    return None


def _one_call(tensors: list[Tensor]) -> bool:
    """True when the whole (non-empty) list can go to one op call."""
    if not _ops.available():
        return False
    if torch.compiler.is_compiling():
        blocker = _python_blocker(tensors)  # traced once; the C++ check is opaque to dynamo
    else:
        try:
            blocker = _ops.single_call_blocker(tensors)
        except TypeError:
            raise _not_a_tensor(tensors, "tensors") from None
    return blocker is None and tensors[0].device.type in _KERNEL_DEVICES


_has_tangent = _fallback.has_tangent


# Why a tensor needs the fallback: (template, detail) of constants, so
# that a trace can hand them to _warn_while_tracing (dynamo cannot make an
# f-string one); the text is made where it is warned.
_NOT_LOADED = "the compiled extension fastclip._C could not be loaded ({})"


def _fallback_reason(t: Tensor) -> Optional[tuple]:
    if not _ops.available():
        return _NOT_LOADED, None
    if t.device.type not in _KERNEL_DEVICES:
        return "this build of fastclip has no kernels for {} tensors", t.device.type
    if t.layout != torch.strided:
        return "the kernels take dense tensors, not {}", t.layout
    if t.dtype not in _KERNEL_DTYPES:
        return "the kernels take float32/float64/float16/bfloat16 tensors, not {}", t.dtype
    if _has_tangent(t):
        return "the kernels do not propagate forward-mode AD tangents", None
    # (dynamo cannot trace is_neg(); the C++ check routes such views eagerly)
    if not torch.compiler.is_compiling() and t.is_neg():
        return "torch refuses in-place ops on a list holding a negative-bit view (torch._neg_view)", None
    if not torch.compiler.is_compiling() and torch._is_functional_tensor(t):
        return "torch.func.functionalize cannot run custom ops that write a list of tensors in place", None
    return None


def _reason_text(template: str, detail) -> str:
    return template.format(_ops.import_error() if template is _NOT_LOADED else detail)


# Frames skipped when a warning is attributed: fastclip's own, and torch's
# between the user and us (the no_grad decorator, an optimizer's step hooks),
# and the wrapper of the deprecated alias (found in review: its warnings
# pointed into typing_extensions).
_SKIPPED_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))
# (The wrapper's file from its code: typing_extensions may re-export the
# standard library's, which Python 3.14 defines outside `warnings`.)
_SKIPPED_FILES = frozenset(os.path.abspath(f) for f in (deprecated.__call__.__code__.co_filename, warnings.__file__))


def _skipped(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_SKIPPED_DIRS) or path in _SKIPPED_FILES


def _warn(message: str) -> None:
    """warnings.warn attributed to the first caller outside fastclip and
    torch, whichever function path led here."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _skipped(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _warn_once(template: str, detail) -> None:
    if torch.compiler.is_compiling():
        _warn_while_tracing(template, detail)
        return
    reason = _reason_text(template, detail)
    if reason not in _warned:
        _warn(f"fastclip: computing with plain PyTorch because {reason}")
        _warned.add(reason)  # after: a warning filter's "error" raises on every call


@torch.compiler.assume_constant_result
def _warn_while_tracing(template: str, detail) -> bool:
    """_warn_once while dynamo traces: it runs functions marked so at trace
    time, and a compiled graph cannot warn (found in review: a program that
    called fastclip only under torch.compile never heard why it ran on the
    fallback). Reads ``_warned`` here, not in the traced code, where the
    set would be guarded and its change recompile."""
    reason = _reason_text(template, detail)
    if reason not in _warned:
        # Under warnings.simplefilter("error") dynamo raises its
        # InternalTorchDynamoError around the warning (found in review),
        # then on every call, as eager raises the warning on every call.
        _warn(f"fastclip: computing with plain PyTorch because {reason}")
        _warned.add(reason)
    return True


class _Part:
    """Tensors of one device that share an implementation (kernels or fallback)."""

    def __init__(self, device: torch.device, impl, indices: list[int], tensors: list[Tensor]):
        self.device, self.impl, self.indices, self.tensors = device, impl, indices, tensors


def _dispatch_type(t: Tensor) -> Optional[type]:
    """The class of a ``__torch_dispatch__`` subclass, else None. Such a
    class runs an op once per call on its own terms (a wrapper of two
    tensors, once per component), and every other tensor of the call with
    it (found in review: a plain gradient listed with one was scaled twice)."""
    kind = type(t)
    if kind is Tensor or kind is Parameter:
        return None
    return kind if kind.__torch_dispatch__ is not Tensor.__torch_dispatch__ else None


def _split(tensors: list[Tensor]) -> list[_Part]:
    """Per device: the tensors the kernels take, and those that need the
    fallback; ``__torch_dispatch__`` subclasses apart, one part per class."""
    buckets: dict = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise _not_a_tensor(tensors, "tensors")
        reason = _fallback_reason(t)
        if reason is not None:
            _warn_once(*reason)
        buckets.setdefault((t.device, reason is None, _dispatch_type(t)), []).append(i)
    return [
        _Part(device, _ops if use_kernels else _fallback, idx, [tensors[i] for i in idx])
        for (device, use_kernels, _), idx in buckets.items()
    ]


def _index(indices: Union[list[int], Tensor], device: torch.device) -> Tensor:
    """An int64 index tensor on ``device`` (``indices``: a list, or an int64
    CPU tensor); to a GPU from pinned memory, asynchronously (a copy from
    pageable memory would sync the host)."""
    index = indices if isinstance(indices, Tensor) else torch.tensor(indices, dtype=torch.long, device="cpu")
    return _distributed.to_device_async(index, device)


def _split_norms(parts: list[_Part], first: torch.device, n: int, ord: float, per_tensor: bool, fp64: bool = False):
    """Total norm (float64, on ``first``) and per-tensor norms (float32, or
    float64 with ``fp64``) over all parts. Every part's norms are float64,
    so that none is rounded to float32 before they are combined (an fp64
    part whose norm is beyond float32's range stays finite)."""
    dtype = torch.float64 if fp64 else torch.float32
    totals, eaches, order = [], [], []
    for part in parts:
        if part.impl is _fallback:
            _refuse_unreadable(part)
            total, part_each = _fallback.norms64(part.tensors, ord)
        else:
            total, part_each = _ops.multi_tensor_norm(part.tensors, ord, per_tensor, fp64=True)
        totals.append(total.to(first, torch.float64))
        if per_tensor:
            eaches.append(part_each.to(first, dtype))
            order.extend(part.indices)
    if not per_tensor:
        each = torch.zeros((0,), dtype=dtype, device=first)
    else:
        # Concatenated and put in list order by one gather, not copied into
        # a new plain tensor: the norms of a wrapper subclass's gradients
        # (two tensors in one) stay whole (found in review: one component
        # was kept, silently).
        each = torch.cat(eaches)
        if order != list(range(n)):
            where = [0] * n
            for position, i in enumerate(order):
                where[i] = position
            each = each[_index(where, first)]
    return _fallback.combine(torch.stack(totals), ord), each


def _norms(tensors: list[Tensor], ord: float, per_tensor: bool, one_call: bool, fp64: bool = False):
    """Total and per-tensor norms: float32, or float64 (not rounded) with ``fp64``."""
    if one_call:
        return _ops.multi_tensor_norm(tensors, ord, per_tensor, fp64)
    total, each = _split_norms(_split(tensors), tensors[0].device, len(tensors), ord, per_tensor, fp64)
    return (total if fp64 else total.to(torch.float32)), each


def _coefficient(max_norm: MaxNorm, total_norm: Tensor) -> Tensor:
    """min(1, max_norm / (norm + 1e-6)) in float64, NaN kept, on the norm's device.

    A true division, as the ops' kernels take it: ``max_norm / tensor`` is
    ``tensor.reciprocal() * max_norm`` in torch, a rounding more (one ulp
    off in about a quarter of cases)."""
    norm = total_norm.to(torch.float64)
    if isinstance(max_norm, Tensor):
        numerator = max_norm.detach().reshape(()).to(norm.device, torch.float64)
    elif torch.compiler.is_compiling():
        # Not full_like: dynamo's inductor and aot_eager backends specialized
        # its float, a graph per value of a max_norm schedule (found in
        # review); 1 * max_norm is exact (eager: one op less).
        numerator = torch.ones_like(norm) * max_norm
    else:
        numerator = torch.full_like(norm, max_norm)
    return torch.clamp(numerator / (norm + 1e-6), max=1.0)


def _coef_for(coef: Tensor, device: torch.device) -> Tensor:
    """The coefficient where the scale op takes it: on ``device`` or the CPU."""
    return coef if coef.device in (device, _CPU) else coef.to(device)


def _refuse_unwritable(tensors: list[Tensor], held=None) -> None:
    """Before the split path writes anything, what any part would refuse:
    one op call checks its whole list before writing, but the parts are
    written one after the other (kernels, plain PyTorch, devices), so a
    part refused after another was written would leave the list half
    scaled. The ops refuse an inference tensor outside InferenceMode, a
    tensor whose elements share memory and one beyond its storage; the
    fallback's torch ops refuse the first two only while writing. Not
    while dynamo traces (it cannot trace these checks; the ops still refuse
    such tensors when the graph runs). ``held``: the same list gathered in
    C++, checked without another conversion of the list."""
    if torch.compiler.is_compiling():
        return
    found = held.first_unwritable() if held is not None else _ops.first_unwritable(tensors)
    if found is None:
        return
    i, why = found
    name = f"gradient {i} (counting non-None gradients)"
    if why == "inference":
        raise RuntimeError(
            f"{name} is an inference tensor, and an inplace update to "
            "an inference tensor outside InferenceMode is not allowed (as in torch); clone() it first or "
            "call this under torch.inference_mode()"
        )
    if why == "overlap":
        raise RuntimeError(
            f"{name} has elements that share memory (an expand()ed view?), so it cannot be written in "
            "place; clone() it first"
        )
    raise _beyond_storage(name, tensors[i])


def _beyond_storage(name: str, t: Tensor) -> RuntimeError:
    return RuntimeError(
        f"{name} has elements beyond the memory of its storage "
        f"({t.untyped_storage().nbytes()} bytes; was it resized or freed?)"
    )


def _refuse_unreadable(part: _Part) -> None:
    """Before the fallback reads ``part``: a tensor with elements beyond its
    storage, which the ops refuse (found in review: the fallback read past
    the memory of a complex gradient, NaN or a crash)."""
    if torch.compiler.is_compiling():
        return
    k = _fallback.first_beyond_storage(part.tensors)
    if k is not None:
        raise _beyond_storage(f"gradient {part.indices[k]} (counting non-None gradients)", part.tensors[k])


def _refuse_unsupported(parts: list, op: str) -> None:
    """Before the split path writes anything: a dtype torch's own ``op``
    cannot write (float8, integers) would fail in the fallback's part after
    the kernels' part was written (found in review)."""
    if torch.compiler.is_compiling():
        return
    for part in parts:
        if part.impl is _fallback:
            found = _fallback.first_unsupported(part.tensors, op)
            if found is not None:
                k, error = found
                raise TypeError(
                    f"gradient {part.indices[k]} (counting non-None gradients) is {part.tensors[k].dtype} on "
                    f"{part.device}, which torch's {op} cannot write ({error}); nothing was modified"
                )


def _scale(tensors: list[Tensor], coef: Tensor, one_call: bool) -> None:
    if one_call and not _has_tangent(coef):
        _ops.multi_tensor_scale_(tensors, _coef_for(coef, tensors[0].device))
        return
    _refuse_unwritable(tensors)
    _scale_parts(_split(tensors), coef)


def _known_one(coef: Tensor) -> bool:
    """The coefficient is exactly 1, as the host can tell without waiting for
    a device: a plain CPU tensor, read outside tracing."""
    return (
        type(coef) is Tensor and coef.device == _CPU and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        # (not a vmap-batched one: a value per sample, no item(); found in review;
        # nor torch.func's wrappers, batched inside under vmap(jvp(f)))
        and not torch._C._functorch.is_functorch_wrapped_tensor(coef) and coef.item() == 1.0
    )


def _scale_parts(parts: list[_Part], coef: Tensor) -> None:
    """Scale every part by ``coef``; checks first, as the split path does."""
    if _has_tangent(coef):
        # Every gradient's tangent gains g * coef's tangent (torch's mul_),
        # those of gradients without one too: all of them in plain PyTorch.
        parts = [_Part(p.device, _fallback, p.indices, p.tensors) for p in parts]
    _refuse_unsupported(parts, "mul_")  # whatever the coefficient (found in review: a float8 gradient passed at 1)
    if not _has_tangent(coef) and _known_one(coef):
        return  # as the op: no memory traffic (found in review: the fallback's mul_ wrote every gradient)
    for part in parts:
        # A CPU coefficient stays there (the ops read it on the host; a copy
        # to a GPU from pageable memory would wait for it; found in review).
        part.impl.multi_tensor_scale_(part.tensors, _coef_for(coef, part.device))


def _scale_held(held, coef: Tensor) -> None:
    """Scale the held tensors (held.one_call) by ``coef``."""
    if _has_tangent(coef):
        _scale(held.tensors(), coef, False)
    else:
        held.scale_(_coef_for(coef, held.device))


def _list_norms(tensors: list[Tensor], ord: float, per_tensor: bool, fp64: bool = False) -> tuple[Tensor, Tensor]:
    """``_norms`` of a non-empty list, through the C++ holder when one op call takes it."""
    held = _held(tensors, False, "tensors")
    if held is not None and held.one_call:
        return held.norm(ord, per_tensor, fp64)
    return _norms(tensors, ord, per_tensor, _one_call(tensors), fp64)


def _list_scale(tensors: list[Tensor], coef: Tensor) -> None:
    """``_scale`` of a non-empty list, through the C++ holder when one op call takes it."""
    held = _held(tensors, False, "tensors")
    if held is not None and held.one_call:
        _scale_held(held, coef)
    else:
        _scale(tensors, coef, _one_call(tensors))


def _needs_global(tensors: list[Tensor], one_call: bool, groups: list) -> bool:
    """True when the norm spans processes: groups were given, or DTensors
    (which the C++ check reports as a subclass, so never on the one-call path)."""
    return bool(groups) or (len(tensors) > 0 and not one_call and _distributed.has_dtensor(tensors))


def _global_norms(
    tensors: list[Tensor], ord: float, per_tensor: bool, groups: list, name: str,
    local_divisor: Optional[Tensor] = None, local_found: Optional[Tensor] = None, writes=False,
):
    """Norms over DTensor shards and/or rank-local lists spread over ``groups``.

    Returns ``(total, each, locals, sharding, held)``: the float64 global
    norm, the per-tensor float32 norms (global over the mesh for DTensors,
    local for plain tensors), the local tensors to scale, the DTensors'
    sharding, and with ``writes`` the local tensors gathered in C++ where
    one op call takes them (else None). ``local_divisor`` (a loss scale)
    divides this rank's norms before they are combined, and
    ``local_found`` (a flag) > 0 makes them inf. ``writes`` (True, or a
    function of the local tensors and ``held`` that says whether they
    will be written): local tensors the scale would refuse are refused
    before the collectives (found in review: refused after them, the
    other ranks had clipped by a norm that held this rank's part).
    """
    locals_, sharding = _distributed.unwrap(tensors, name)
    _distributed.check_mesh_apart(sharding, groups)
    held = None
    if writes is not False and locals_:
        # Gathered once for the checks, the local norm and the scale.
        gathered = _held(locals_, False, "tensors")
        one = gathered.one_call if gathered is not None else _one_call(locals_)
        held = gathered if one else None
        if writes is True or writes(locals_, held):
            _refuse_unwritable(locals_, held)
            if not one:
                _refuse_unsupported(_split(locals_), "mul_")
    keys = sharding.keys if sharding is not None else [()] * len(locals_)
    # Partial tensors' norms come from their reductions; the scale writes
    # each rank's part (the pending reduction scales with its parts).
    pending = sharding.partial if sharding is not None else {}
    held_norms = None if pending else held
    finish = _distributed.finished
    try:
        measured, finish = _distributed.reduce_partials(locals_, sharding)
        if not locals_:  # this rank holds nothing but must still join the collectives
            local = torch.zeros((0,), dtype=torch.float64, device=_distributed.collective_device(groups))
            entry_keys: list = []
        elif per_tensor:
            finish()
            # float64 local norms: one beyond float32's range stays finite (found
            # in review: a rank whose float32 norm overflowed made the global one inf).
            _, local = (held_norms.norm(ord, True, True) if held_norms is not None
                        else _list_norms(measured, ord, True, fp64=True))
            entry_keys = keys
        else:
            classes: dict = {}  # sharded mesh dims -> tensor indices: one local pass per class
            for i, key in enumerate(keys):
                classes.setdefault(key, []).append(i)
            if held_norms is not None and len(classes) == 1:
                norms = {next(iter(classes)): held_norms.norm(ord, False, True)[0]}
            else:
                norms = {}
                # Classes without a pending reduction first: their pass hides its wait.
                for key, indices in sorted(classes.items(), key=lambda kv: any(i in pending for i in kv[1])):
                    if any(i in pending for i in indices):
                        finish()
                    norms[key] = _list_norms([measured[i] for i in indices], ord, False, fp64=True)[0]
            local, entry_keys = torch.stack(list(norms.values())), list(norms)
    finally:
        finish()  # also on an error: the other ranks complete it
    if local_divisor is not None:
        local = local / local_divisor.reshape(()).to(local.device, torch.float64)
    if local_found is not None:
        local = torch.where(local_found.reshape(()).to(local.device) > 0, math.inf, local)
    # A rank's own divisor or flag makes its copy of a replicated or reduced
    # entry differ from the others': reduced over every mesh dimension then.
    every_dim = local_divisor is not None or local_found is not None
    total, entries = _distributed.reduce_norms(local, entry_keys, sharding, groups, ord, per_entry=per_tensor,
                                               every_dim=every_dim)
    each = entries.to(torch.float32) if per_tensor else local.new_zeros((0,), dtype=torch.float32)
    return total, each, locals_, sharding, held


def _as_result(total: Tensor, sharding) -> Tensor:
    """The float32 norm, as a replicated DTensor when the inputs were DTensors (as torch returns)."""
    total = total.to(torch.float32)
    return _distributed.replicate_like(total, sharding) if sharding is not None else total


def _local(tensors: list[Tensor], one_call: bool, name: str, clamp: bool = False):
    """DTensors replaced by their local shards (for element-wise work: a
    scale, or with ``clamp`` a clamp): ``(tensors, one_call, sharding)``."""
    if one_call:
        return tensors, True, None
    locals_, sharding = _distributed.unwrap(tensors, name)
    if sharding is None:
        return tensors, False, None
    if clamp:
        _distributed.refuse_partial_clamp(sharding, name)
    return locals_, len(locals_) > 0 and _one_call(locals_), sharding


# ------------------------------------------------------------- public API
@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    process_group=None,
) -> Tensor:
    """Norm of ``tensors`` seen as one vector, like ``torch.nn.utils.get_total_norm``.

    Returns a float32 0-dim tensor on the first tensor's device (a CPU zero
    for an empty list; a replicated DTensor for DTensor inputs). ``foreach``
    is accepted for compatibility and ignored: the kernels always process
    the whole list at once. ``process_group`` (a group or a sequence of
    groups): ``tensors`` is this rank's part of a list spread over the
    groups' processes, and the norm is that of the whole list.
    """
    del foreach
    tensors = _as_list(tensors)
    norm_type = _norm_type(norm_type)
    groups = _distributed.groups_of(process_group)
    held = _held(tensors, False, "tensors")
    if held is not None and held.one_call and not groups:
        total, _ = held.norm(norm_type, False)
        if error_if_nonfinite:
            _raise_if_nonfinite(total, norm_type)
        return total
    one_call = held.one_call if held is not None else len(tensors) > 0 and _one_call(tensors)
    if _needs_global(tensors, one_call, groups):
        total, _, _, sharding, _ = _global_norms(tensors, norm_type, False, groups, "tensors")
        if error_if_nonfinite:
            # On the float32 norm it returns, as on one process (found in
            # review: a float64 norm beyond float32's range passed, and
            # came back inf); every rank holds the same value.
            _raise_if_nonfinite(total.to(torch.float32), norm_type)
        return _as_result(total, sharding)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    total, _ = _norms(tensors, norm_type, False, one_call)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, norm_type)
    return total


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: Optional[bool] = None,
) -> None:
    """Scale gradients by ``min(1, max_norm / (total_norm + 1e-6))``, like torch's.

    The coefficient stays on the device (no host sync); gradients are not
    touched when it is exactly 1.
    """
    del foreach
    max_norm = _max_norm(max_norm)
    held = _held(parameters, True, "parameters")
    if isinstance(total_norm, Tensor) and hasattr(total_norm, "full_tensor"):
        # A DTensor: its full value (no communication when it is replicated,
        # as fastclip's and torch's total norms are; a Partial one, such as
        # vector_norm of a sharded gradient, is reduced first, as torch's
        # DTensor arithmetic does; found in review: each rank used its own part).
        total_norm = total_norm.full_tensor()
    total_norm = _total_norm(total_norm)
    if held is not None and held.one_call:
        _scale_held(held, _coefficient(max_norm, total_norm))
        return
    grads, one_call = _grads(parameters, held)
    if len(grads) == 0:
        return
    grads, one_call, sharding = _local(grads, one_call, "parameters")
    coef = _coefficient(max_norm, total_norm)
    signed = _distributed.signed_parts(sharding)
    if signed:
        # A pending max or min scales with its parts for a coefficient >= 0
        # only; a negative one (a negative total_norm) makes them NaN, as a
        # NaN norm would, not silently the other extreme (found in review).
        apart = set(signed)
        rest = [g for i, g in enumerate(grads) if i not in apart]
        if rest:
            _scale(rest, coef, _one_call(rest))
        grads = [grads[i] for i in signed]
        coef, one_call = torch.where(coef >= 0, coef, math.nan), _one_call(grads)
    _scale(grads, coef, one_call)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    process_group=None,
) -> Tensor:
    """Clip the gradients' total norm to ``max_norm`` in place; return the norm.

    Same signature and result as ``torch.nn.utils.clip_grad_norm_``. On one
    device this is one fused op: norm, coefficient and scale, with no host
    sync. NaN/inf gradients propagate as in torch (the norm becomes NaN/inf
    and so do the gradients) unless ``error_if_nonfinite`` is set, in which
    case a RuntimeError is raised and no gradient is modified.

    ``process_group`` (a group or a sequence of groups, e.g. data- and
    model-parallel): ``parameters`` are this rank's part of a model spread
    over the groups' processes; the norm is the global one (one all_reduce
    of a scalar per group) and every rank applies the same coefficient.
    DTensor gradients (FSDP2, tensor parallel) are reduced over their mesh
    without being asked; parameters replicated on several ranks of a
    ``process_group`` must be passed by one rank only.
    """
    del foreach
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)  # read once, by whichever path follows
        if not parameters:
            _warn("`parameters` is an empty generator, no gradient clipping will occur.")  # as torch warns
    error_if_nonfinite = bool(error_if_nonfinite)
    held = _held(parameters, True, "parameters")
    max_norm = _max_norm(max_norm)
    norm_type = _norm_type(norm_type)
    groups = _distributed.groups_of(process_group)
    # The fused op takes max_norm as a host float. A tensor goes through the
    # norm and a scale by the coefficient tensor (the split path), and so
    # does any max_norm while dynamo traces: the op's float argument would
    # specialize the graph on its value (found in review: a new graph for
    # every value of a max_norm schedule; dynamo gives a symbolic float
    # the type float, so it cannot be told apart).
    # error_if_nonfinite keeps the fused op under compile: it raises from
    # inside the graph, where the split path's host read cannot be traced.
    fused = isinstance(max_norm, float) and (error_if_nonfinite or not torch.compiler.is_compiling())
    if error_if_nonfinite and _unreadable(max_norm):  # the fused op takes a float the host knows
        raise ValueError(
            "max_norm must be a Python number or a tensor under torch.compile with error_if_nonfinite=True, "
            "got a value the trace cannot read (a numpy scalar argument, or .item())"
        )
    if held is not None and held.one_call and not groups and fused:
        return held.clip_(max_norm, norm_type, error_if_nonfinite)
    grads, one_call = _grads(parameters, held)
    if _needs_global(grads, one_call, groups):
        total, _, locals_, sharding, held = _global_norms(grads, norm_type, False, groups, "parameters", writes=True)
        if error_if_nonfinite:
            _raise_if_nonfinite(total, norm_type)  # the same decision on every rank
        if held is not None:
            _scale_held(held, _coefficient(max_norm, total))
        elif locals_:
            _list_scale(locals_, _coefficient(max_norm, total))
        return _as_result(total, sharding)
    if len(grads) == 0:
        return torch.tensor(0.0)
    if one_call and fused:
        return _ops.clip_(grads, max_norm, norm_type, error_if_nonfinite)
    _refuse_unwritable(grads)
    parts = _split(grads)
    _refuse_unsupported(parts, "mul_")
    first = grads[0].device
    total, _ = _split_norms(parts, first, len(grads), norm_type, per_tensor=False)
    if error_if_nonfinite:
        # On the float64 norm, as the fused op decides (a finite norm above
        # float32's range is clipped, and returned as inf).
        _raise_if_nonfinite(total, norm_type)
    _scale_parts(parts, _coefficient(max_norm, total))
    return total.to(torch.float32)


@deprecated(
    "`fastclip.clip_grad_norm` is now deprecated in favor of `fastclip.clip_grad_norm_` "
    "(as `torch.nn.utils.clip_grad_norm` is in torch).",
    category=FutureWarning,
)
def clip_grad_norm(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> Tensor:
    """Deprecated alias of :func:`clip_grad_norm_`, as torch keeps
    ``torch.nn.utils.clip_grad_norm``: code written against it keeps working
    after the switch to fastclip, with torch's FutureWarning (and the same
    marker for type checkers)."""
    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: Optional[bool] = None,
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place.

    One fused pass (torch makes two: clamp_min_ then clamp_max_). NaN stays NaN.
    """
    del foreach
    clip_value = _clip_value(clip_value)
    held = _held(parameters, True, "parameters")
    if held is not None and held.one_call:
        held.clamp_(clip_value)
        return
    grads, one_call = _grads(parameters, held)
    if len(grads) == 0:
        return
    grads, one_call, _ = _local(grads, one_call, "parameters", clamp=True)
    if _unreadable(clip_value):  # the op takes a float the host knows; torch's clamp_ takes this one
        _fallback.check_clampable(grads, [f"gradient {i} (counting non-None gradients)" for i in range(len(grads))])
        _fallback.multi_tensor_clamp_(grads, clip_value)
        return
    if one_call:
        _ops.multi_tensor_clamp_(grads, clip_value)
        return
    _refuse_unwritable(grads)
    parts = _split(grads)
    _refuse_unsupported(parts, "clamp_")
    for part in parts:
        if part.impl is _fallback:
            _fallback.check_clampable(part.tensors, [f"gradient {i} (counting non-None gradients)" for i in part.indices])
    for part in parts:
        part.impl.multi_tensor_clamp_(part.tensors, clip_value)


@torch.no_grad()
def grad_norms(parameters: TensorOrTensors, norm_type: float = 2.0, process_group=None) -> tuple[Tensor, Tensor]:
    """Total gradient norm and the norm of each parameter's gradient, in one pass.

    Returns ``(total, per_parameter)``: ``total`` is a float32 0-dim tensor,
    ``per_parameter`` a float32 vector with one entry per element of
    ``parameters`` (0 where the gradient is None), both on the first
    gradient's device. Nothing is modified. With DTensor gradients both are
    plain tensors holding the full (global) norms; with ``process_group``
    the total is global and the per-parameter norms are of this rank's
    parameters.
    """
    params = _as_list(parameters)
    norm_type = _norm_type(norm_type)
    groups = _distributed.groups_of(process_group)
    held = _held(params, True, "parameters")
    if held is not None and held.one_call and not groups:
        total, each = held.norm(norm_type, True)
    else:
        grads, one_call = _grads(params, held)
        if _needs_global(grads, one_call, groups):
            total, each, _, _, _ = _global_norms(grads, norm_type, True, groups, "parameters")
            total = total.to(torch.float32)
        elif len(grads) == 0:  # float32 as documented, whatever the default dtype
            return torch.tensor(0.0, dtype=torch.float32), torch.zeros(len(params), dtype=torch.float32)
        else:
            total, each = _norms(grads, norm_type, True, one_call)
    if each.shape[0] == len(params):  # no gradient is None
        return total, each
    # Where the gradients were: from the C++ gather when there was one (read
    # again from Python, every .grad cost ~70 ns). Not under a dispatch mode:
    # its tensor would be the mode's (found in review: a FakeTensorMode's,
    # with no memory to write the positions to).
    if held is not None and _get_current_dispatch_mode() is None:
        have = held.positions()
    else:
        have = [i for i, p in enumerate(params) if p.grad is not None]
    out = each.new_zeros((len(params),))  # a subclass's new_zeros: its norms stay whole (see _split_norms)
    out.index_copy_(0, _index(have, each.device), each)
    return total, out
