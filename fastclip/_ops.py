"""Typed wrappers over ``torch.ops.fastclip.*`` and their fake implementations.

The schemas live in ``csrc/ops.cpp``; this module only loads the extension,
gives each op a Python signature, and registers the fake (meta) kernels that
``torch.compile`` and ``FakeTensor`` need to trace through the ops.
"""
from __future__ import annotations

import functools
import importlib
import math
import sys
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensor

from . import _fallback

try:
    # Loading it registers the ops. By name: `from . import _C` would report
    # a missing module as a circular import of the package (found in review).
    _C = importlib.import_module(__package__ + "._C")

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as error:  # the extension was not built, or does not match this torch
    _C = None
    _IMPORT_ERROR = error


def available() -> bool:
    """True when the compiled extension is loaded."""
    return _C is not None


def import_error() -> Optional[BaseException]:
    """Why the extension could not be loaded, or None."""
    return _IMPORT_ERROR


def build_info() -> dict:
    """How the extension was built (``{}`` when it is not loaded)."""
    return dict(_C.build_info()) if _C is not None else {}


@functools.lru_cache(maxsize=None)
def has_kernel(device_type: str) -> bool:
    """True when the ops have an implementation for this device type."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastclip::clip_", key)


def single_call_blocker(tensors: list[Tensor]) -> Optional[str]:
    """None if ``tensors`` can go to one op call, else the reason (checked in C++)."""
    return _C.single_call_blocker(tensors)


def dense_and_apart(tensors: list[Tensor]) -> bool:
    """True when every tensor is one dense block (strided, neither gaps nor
    overlap, in any order of its dimensions) and no two share bytes: one
    C++ pass, or in Python where the extension is not loaded or dynamo
    traces (there only the same tensor twice is seen as shared)."""
    if _C is not None and not torch.compiler.is_compiling():
        return _C.dense_and_apart(tensors)
    if not all(_dense(t) for t in tensors):
        return False
    if torch.compiler.is_compiling():
        # Tensors as dict keys: dynamo guards on their aliasing, as it does
        # for every input. id() guarded on each object, and a step compiled
        # after zero_grad() freed the gradients recompiled every time
        # (found in review).
        return len(dict.fromkeys(tensors)) == len(tensors)
    ranges = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in tensors
        if t.numel() > 0 and t.device.type != "meta" and not torch._C._dispatch_keys(t).has(_PYTHON_KEY)
    )
    return all(ranges[k][0] >= ranges[k - 1][1] for k in range(1, len(ranges)))


_PYTHON_KEY = torch._C.DispatchKey.Python  # fake and wrapper subclasses: no memory of their own to compare


def _dense(t: Tensor) -> bool:
    if t.layout != torch.strided:
        return False
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted((p for p in zip(t.shape, t.stride()) if p[0] != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def first_unwritable(tensors: list[Tensor]) -> Optional[tuple[int, str]]:
    """``(i, why)`` for the first tensor an in-place op would refuse, ``why``
    one of "inference", "overlap" (elements that share memory) or "storage"
    (elements beyond its storage's memory); None if there is none. The ops'
    own C++ checks, one pass (10,000 tensors: 1 ms, mostly the list's
    conversion); in Python when the extension is not loaded (about 9 ms per
    1,000 tensors)."""
    if _C is not None:
        return _C.first_unwritable(tensors)
    inference_ok = torch.is_inference_mode_enabled()
    for i, t in enumerate(tensors):
        if not inference_ok and t.is_inference():  # every layout
            return i, "inference"
        if t.layout != torch.strided:
            continue
        if torch._debug_has_internal_overlap(t) == 1:
            return i, "overlap"
        if _fallback.first_beyond_storage([t]) is not None:
            return i, "storage"
    return None


def same_objects(items, kept: tuple) -> bool:
    """True when iterating ``items`` (a list, a dict's keys) gives the objects
    of ``kept``, the same ones in the same order: by identity, in C++ (161
    objects: under 1 us, against about 10 us for their ids in Python)."""
    if _C is not None and not torch.compiler.is_compiling():
        return _C.same_objects(items, kept)
    return tuple(map(id, items)) == tuple(map(id, kept))


def hold(items: list, grads: bool, name: str):
    """``items`` (their gradients that are not None, when ``grads``) gathered
    in one C++ pass into a ``_C.HeldTensors``, whose methods ``norm``,
    ``scale_``, ``clamp_`` and ``clip_`` call the ops from C++ without a
    Python list. A non-tensor element raises TypeError naming ``name[i]``."""
    return _C.HeldTensors(items, grads, name)


def unwrap_dtensors(items: list, dtensor_type, shard_types: tuple, replicate_type, partial_type):
    """``(locals, keys, mesh)`` of DTensors on one mesh read in C++, or None
    (no extension, or a list Python must take item by item: other meshes,
    Partial or unknown placements)."""
    if _C is None or not hasattr(_C, "unwrap_dtensors"):
        return None
    return _C.unwrap_dtensors(items, dtensor_type, shard_types, replicate_type, partial_type)


def multi_tensor_norm(tensors: list[Tensor], ord: float, per_tensor: bool, fp64: bool = False,
                      slices: int = 1) -> tuple[Tensor, Tensor]:
    """Total norm (float32, 0-dim) and, if ``per_tensor``, each tensor's norm;
    float64 and not rounded to float32 with ``fp64``. ``slices > 1``: the
    norm of each slice of every tensor along its first dimension (of that
    size) instead, tensor-major."""
    return torch.ops.fastclip.multi_tensor_norm.default(tensors, float(ord), bool(per_tensor), bool(fp64),
                                                        int(slices))


def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """``tensors *= coef`` in place; nothing is touched when ``coef == 1``."""
    torch.ops.fastclip.multi_tensor_scale_.default(tensors, coef)


def multi_tensor_clamp_(tensors: list[Tensor], clip_value: float) -> None:
    """Clamp every element to ``[-clip_value, clip_value]`` in place."""
    torch.ops.fastclip.multi_tensor_clamp_.default(tensors, float(clip_value))


def clip_(tensors: list[Tensor], max_norm: float, ord: float, error_if_nonfinite: bool = False) -> Tensor:
    """Fused norm, coefficient and scale; returns the total norm. With
    ``error_if_nonfinite``, a NaN/inf norm raises before anything is written."""
    return torch.ops.fastclip.clip_.default(tensors, float(max_norm), float(ord), bool(error_if_nonfinite))


def clip_scalars_(
    norm: Tensor, max_norm: float, loss_scale: Optional[Tensor], extra_scale: Optional[Tensor],
    found_inf: Optional[Tensor], extra_found: Optional[Tensor], skip_inf_divisor: bool,
    last_norm: Tensor, last_coef: Tensor, skipped: Tensor, count_skip: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The scalars of a clipped optimizer step in one kernel: ``(factor,
    divisor, found)``; writes ``last_norm``, ``last_coef`` and, with
    ``count_skip``, adds ``found`` to ``skipped`` (see the schema)."""
    return torch.ops.fastclip.clip_scalars_.default(
        norm, float(max_norm), loss_scale, extra_scale, found_inf, extra_found, bool(skip_inf_divisor),
        last_norm, last_coef, skipped, bool(count_skip),
    )


if _C is not None:
    # Each fake kernel makes the op's own data-free checks (C++, shared with
    # the kernels), so that a traced graph is refused as an eager call is; a
    # meta tensor among real ones dispatches the whole call here, and is
    # refused as the kernels refuse another device (found in review).

    @torch.library.register_fake("fastclip::multi_tensor_norm")
    def _multi_tensor_norm_fake(tensors, ord, per_tensor, fp64=False, slices=1):
        if isinstance(slices, int):
            _C.check_list_op("multi_tensor_norm", tensors, ord=ord, slices=slices)
        else:
            # A symbolic batch size (vmap under a dynamic compile) stays one:
            # C++ would take it as a constant (found in review: a graph per
            # batch size). Its check on the symbolic shapes, in Python.
            _C.check_list_op("multi_tensor_norm", tensors, ord=ord)
            _fallback.check_slices([t.shape for t in tensors], slices)
        dtype = torch.float64 if fp64 else torch.float32
        total = torch.empty((), dtype=dtype, device=tensors[0].device)
        each = torch.empty((len(tensors) * slices if per_tensor else 0,), dtype=dtype, device=tensors[0].device)
        return total, each

    @torch.library.register_fake("fastclip::multi_tensor_scale_")
    def _multi_tensor_scale_fake(tensors, coef):
        _C.check_list_op("multi_tensor_scale_", tensors, coef=coef)
        return None

    @torch.library.register_fake("fastclip::multi_tensor_clamp_")
    def _multi_tensor_clamp_fake(tensors, clip_value):
        _C.check_list_op("multi_tensor_clamp_", tensors, clip_value=clip_value)
        return None

    @torch.library.register_fake("fastclip::clip_")
    def _clip_fake(tensors, max_norm, ord, error_if_nonfinite=False):
        _C.check_list_op("clip_", tensors, ord=ord, max_norm=max_norm)
        return torch.empty((), dtype=torch.float32, device=tensors[0].device)

    @torch.library.register_fake("fastclip::clip_scalars_")
    def _clip_scalars_fake(norm, max_norm, loss_scale, extra_scale, found_inf, extra_found, skip_inf_divisor,
                           last_norm, last_coef, skipped, count_skip):
        _C.check_clip_scalars(norm, max_norm, loss_scale, extra_scale, found_inf, extra_found, last_norm, last_coef,
                              skipped)
        return (
            torch.empty((), dtype=torch.float64, device=norm.device),
            torch.empty((), dtype=torch.float32, device=norm.device),
            torch.empty((), dtype=torch.float32, device=norm.device),
        )

    # ------------------------------------------------------------- torch.vmap
    # Batching rules: a batched tensor is its underlying value with a batch
    # dimension. The norms of every sample are one op call on all samples'
    # slices (float64 per-tensor norms, combined per sample as the split
    # path combines devices), not a call per sample (256 samples of 12 small
    # tensors: 12.2 -> 7.9 ms; the views cost the most, see the README's
    # Known limitations). A per-sample coefficient is then one multiply per
    # tensor over all samples, in the kernels' arithmetic (_fallback's
    # scale); a clamp, or a scale by one coefficient for all samples, is one
    # op call on the values. Under torch.compile the rules are traced like
    # any other Python code.

    def _check_samples_writable(op, tensors, dims, per_sample_value: Optional[str]):
        """What cannot be written per sample, refused before anything is:
        a value whose samples share memory or reach beyond its storage, and,
        when each sample gets its own value, a tensor that is not batched;
        and what the op's autograd kernel refuses, which under vmap runs
        after this rule (torch's mul_ here would record a history)."""
        if torch.is_grad_enabled():
            for i, t in enumerate(tensors):
                if t.requires_grad:
                    raise RuntimeError(
                        f"fastclip::{op}: tensors[{i}] requires grad; the op modifies it in place and is not "
                        "differentiable: call it under torch.no_grad() (fastclip's Python functions do)")
        if per_sample_value is not None:
            for i, d in enumerate(dims):
                if d is None:
                    raise _not_batched(op, i, per_sample_value)
        bad = first_unwritable(list(tensors))
        if bad is not None:
            i, why = bad
            if why == "inference":  # the op's message (found in review: tensors before it were written)
                raise RuntimeError(
                    f"fastclip::{op}: tensors[{i}] is an inference tensor, and an inplace update to an inference "
                    "tensor outside InferenceMode is not allowed (as in torch); clone() it first or call this "
                    "under torch.inference_mode()")
            what = "elements that share memory (an expand()ed view?)" if why == "overlap" else \
                "elements beyond its storage's memory"
            raise RuntimeError(f"fastclip::{op}: under torch.vmap, tensors[{i}] has {what}, so it cannot be "
                               "written in place; clone() it first")

    def _levels(t: Tensor) -> set:
        """The vmap levels ``t`` is batched at (nested vmap wraps once per level)."""
        levels = set()
        while torch._C._functorch.is_batchedtensor(t):
            levels.add(torch._C._functorch.maybe_get_level(t))
            t = torch._C._functorch.get_unwrapped(t)
        return levels

    def _check_outer_levels(op, tensors, coef: Tensor, what: str) -> None:
        """Under nested vmap, a coefficient batched at an outer level cannot
        be written into a tensor that is not: refused before any write
        (found in review: torch's multiply raised after the tensors before
        it were scaled)."""
        needed = _levels(coef)
        for i, t in enumerate(tensors):
            if not needed <= _levels(t):
                raise _not_batched(op, i, what)

    def _not_batched(op: str, i: int, what: str) -> RuntimeError:
        return RuntimeError(
            f"fastclip::{op}: under torch.vmap, tensors[{i}] is not batched while {what} is, so it cannot be "
            "written in place with a value per sample (torch's in-place ops refuse it too); make it an input of "
            "the vmapped function or clone it per sample")

    def _sample_norms(tensors, dims, batch: int, ord: float, slices: int = 1) -> tuple[Tensor, Tensor]:
        """(total, each) of every sample in float64, shapes [batch] and
        [batch, len(tensors) * slices] (batch > 0): the op's per-slice norms
        of the batched tensors with the batch dimension first, from one
        call, then one call for the unbatched ones (under nested vmap each
        sample is ``slices`` slices of the level inside)."""
        batched = [i for i, d in enumerate(dims) if d is not None]
        shared = [i for i, d in enumerate(dims) if d is None]
        parts = []
        if batched:
            rows = [tensors[i] if dims[i] == 0 else tensors[i].movedim(dims[i], 0) for i in batched]
            if slices != 1:
                rows = [_merge_two_batch_dims(r) for r in rows]
            _, norms = torch.ops.fastclip.multi_tensor_norm.default(rows, ord, True, True, batch * slices)
            parts.append(norms.view(len(batched), batch, slices).transpose(0, 1))
        if shared:
            _, norms = torch.ops.fastclip.multi_tensor_norm.default(
                [tensors[i] for i in shared], ord, True, True, slices)
            parts.append(norms.view(len(shared), slices).expand(batch, len(shared), slices))
        columns = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if batched + shared != list(range(len(tensors))):
            where = [0] * len(tensors)
            for position, i in enumerate(batched + shared):
                where[i] = position
            columns = columns[:, torch.tensor(where, device=columns.device)]
        columns = columns.reshape(batch, len(tensors) * slices)
        if ord in _EXACT_POWER_ORDERS:
            # Each row's norm by the op (its rescue keeps norms near the
            # double range finite): one call where torch's ops take ten (0.2 ms).
            _, totals = torch.ops.fastclip.multi_tensor_norm.default([columns], ord, True, True, batch)
        else:  # the kernels' |x|^p of a general order is approximated (found in review: 3e-14 off at 1e80)
            totals = _fallback.combine(columns, ord, dim=1)
        return _settle_the_edge(tensors, dims, totals, ord, slices), columns

    def _readable(t: Tensor) -> bool:
        """Whether ``t``'s values can be read on the host here. A
        FunctionalTensor is AOTAutograd's or export's tracing wrapper, over
        fake values: torch 2.6's is_fake does not see through it, and a
        compiled nested vmap then read a fake tensor (found running the
        suite on 2.6)."""
        return not (torch.compiler.is_compiling() or is_fake(t) or isinstance(t, FunctionalTensor)
                    or torch._C._functorch.is_functorch_wrapped_tensor(t))

    def _settle_the_edge(tensors, dims, totals: Tensor, ord: float, slices: int) -> Tensor:
        """Totals of float64 data at the double range's edge (inf, or within
        _EDGE_RTOL of 1.8e308) taken from the op on that sample alone, where
        they can be read: a combination of rounded norms can fall on the
        other side of the edge than the op's own sum (found in review: a
        sample then got a coefficient of 0, or error_if_nonfinite decided
        otherwise). Data of the other dtypes has norms far below it."""
        if not any(t.dtype == torch.float64 for t in tensors) or not _readable(totals):
            return totals
        for b in torch.nonzero(torch.isinf(totals) | (totals > _EDGE)).flatten().tolist():
            sample = [t if d is None else t.select(d, b) for t, d in zip(tensors, dims)]
            totals[b] = torch.ops.fastclip.multi_tensor_norm.default(sample, ord, False, True, slices)[0]
        return totals

    _EDGE_RTOL = 1e-9  # far beyond the combination's rounding
    _EDGE = sys.float_info.max * (1 - _EDGE_RTOL)

    # Orders whose powers the kernels compute exactly (squares, |x|, max).
    _EXACT_POWER_ORDERS = (1.0, 2.0, math.inf)

    def _merge_two_batch_dims(r: Tensor) -> Tensor:
        """``r`` [batch, slices, ...] as [batch * slices, ...], each slice
        laid out in memory as ``r[b, s]`` is (the op reads a dense sample in
        its memory order, and its bits depend on that order; found in review:
        a copy made row-major changed them): a view where the two dimensions
        merge, else a copy in the slices' own dimension order."""
        if r.shape[0] == 1 or r.shape[1] == 1 or r.stride(0) == r.stride(1) * r.shape[1]:
            return r.flatten(0, 1)
        sizes, strides = r.shape[2:], r.stride()[2:]
        inner = sorted((d for d in range(len(sizes)) if sizes[d] != 1), key=lambda d: strides[d])
        reach = 1
        for d in inner:  # dense: each stride is the reach of the smaller ones
            if strides[d] != reach:
                return r.flatten(0, 1)  # not dense: the op reads a row-major copy of r[b, s] too
            reach *= sizes[d]
        order = [d for d in range(len(sizes)) if sizes[d] == 1] + inner[::-1]  # outermost first
        copy = r.permute(0, 1, *[2 + d for d in order]).contiguous()
        back = [0] * len(order)
        for position, d in enumerate(order):
            back[d] = position
        return copy.permute(0, 1, *[2 + p for p in back]).flatten(0, 1)

    def _empty_batch(like: Tensor, dtype, *shape) -> Tensor:
        return torch.empty((0, *shape), dtype=dtype, device=like.device)

    def _scale_samples(tensors, dims, coef: Tensor) -> None:
        """tensors[i] (batched along dims[i]) times coef[b] in sample b, as
        the kernels multiply: in float32 unless the data is double. The
        coefficients are copied before the first write, as the op reads its
        coefficient once: coef may be a view of a tensor being scaled
        (found in review: `scale_([a, b], a[0])` under vmap scaled b by
        the already scaled a[0])."""
        coefs = {dtype: coef.to(dtype, copy=True) for dtype in (torch.float32, torch.float64)}
        for t, d in zip(tensors, dims):
            shape = [1] * t.dim()
            shape[d] = coef.numel()
            t.mul_(coefs[torch.float64 if t.dtype == torch.float64 else torch.float32].view(shape))

    def _python_rule(qualname: str, rule):
        """``rule`` as torch.library.register_vmap would run it, handed to
        the op's C++ batching rule (csrc/batching.cpp), which takes the
        common case itself and calls this for the others."""
        from torch._functorch.autograd_function import custom_function_call_vmap_helper
        from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

        op = getattr(torch.ops.fastclip, qualname).default

        def run(*args):
            return custom_function_call_vmap_helper(retrieve_current_functorch_interpreter(), rule, op, *args)

        _C.set_vmap_rule(qualname, run)
        PYTHON_VMAP_RULES[qualname] = run

    PYTHON_VMAP_RULES: dict = {}  # what set_vmap_rule was given, by op (tests wrap them)

    def _multi_tensor_norm_vmap(info, in_dims, tensors, ord, per_tensor, fp64=False, slices=1):
        dtype = torch.float64 if fp64 else torch.float32
        _C.check_list_op("multi_tensor_norm", tensors, ord=ord)  # before the slices are made
        _fallback.check_slices([t.shape if d is None else t.shape[:d] + t.shape[d + 1:]
                                for t, d in zip(tensors, in_dims[0])], slices)  # each sample's shape
        if info.batch_size == 0:
            total, each = _empty_batch(tensors[0], dtype), _empty_batch(tensors[0], dtype, len(tensors) * slices)
        else:
            total, each = _sample_norms(tensors, in_dims[0], info.batch_size, ord, slices)
        if not per_tensor:
            each = each[:, :0]
        return (total.to(dtype), each.to(dtype)), (0, 0)

    @torch.library.register_vmap("fastclip::multi_tensor_scale_")
    def _multi_tensor_scale_vmap(info, in_dims, tensors, coef):
        dims, coef_dim = in_dims
        if coef_dim is None:  # one coefficient for every sample
            if _functional(tensors):
                _fallback.multi_tensor_scale_(list(tensors), coef)
            else:
                torch.ops.fastclip.multi_tensor_scale_.default(list(tensors), coef)
            return None, None
        # (A plain tensor of a sample's shape: coef may still be batched at
        # an outer level, which the check cannot read; found in review.)
        sample_coef = torch.empty(coef.shape[:coef_dim] + coef.shape[coef_dim + 1:], dtype=coef.dtype,
                                  device=coef.device)
        _C.check_list_op("multi_tensor_scale_", tensors, coef=sample_coef)
        _check_samples_writable("multi_tensor_scale_", tensors, dims, "coef")
        _check_outer_levels("multi_tensor_scale_", tensors, coef, "coef")
        if torch.is_grad_enabled() and coef.requires_grad:
            raise RuntimeError("fastclip::multi_tensor_scale_: coef requires grad; the op is not differentiable: "
                               "call it under torch.no_grad() (fastclip's Python functions do) or pass "
                               "coef.detach()")
        _scale_samples(tensors, dims, coef.movedim(coef_dim, 0).reshape(info.batch_size))
        return None, None

    def _functional(tensors) -> bool:
        """A value is functionalize's (it wraps the vmap from outside): its
        in-place writes must be torch's ops, as fastclip's functions route
        them without vmap (found in review: functionalize(vmap(f)) of
        clip_grad_value_ failed on the custom op)."""
        return any(torch._is_functional_tensor(t) for t in tensors)

    @torch.library.register_vmap("fastclip::multi_tensor_clamp_")
    def _multi_tensor_clamp_vmap(info, in_dims, tensors, clip_value):
        if _functional(tensors):
            _fallback.multi_tensor_clamp_(list(tensors), clip_value)
        else:
            torch.ops.fastclip.multi_tensor_clamp_.default(list(tensors), clip_value)  # the same bound for every sample
        return None, None

    def _clip_vmap(info, in_dims, tensors, max_norm, ord, error_if_nonfinite=False):
        dims = in_dims[0]
        _C.check_list_op("clip_", tensors, max_norm=max_norm, ord=ord)  # before the samples' checks
        _check_samples_writable("clip_", tensors, dims, "the norm")
        if info.batch_size == 0:
            return _empty_batch(tensors[0], torch.float32), 0
        total, _ = _sample_norms(tensors, dims, info.batch_size, ord)
        if error_if_nonfinite:
            _raise_if_a_sample_is_nonfinite(tensors, dims, total, ord)
        # clip_coefficient in csrc/numerics.h, a true division (a float over
        # a tensor is a reciprocal times it in torch: one ulp off for fp64
        # data in about a quarter of the samples; found in review).
        coef = torch.full_like(total, max_norm) / (total + _CLIP_EPSILON)
        coef = torch.where(torch.isnan(coef) | (coef < 1.0), coef, torch.ones_like(coef))
        _check_outer_levels("clip_", tensors, coef, "the norm")
        _scale_samples(tensors, dims, coef)
        return total.to(torch.float32), 0

    _python_rule("multi_tensor_norm", _multi_tensor_norm_vmap)
    _python_rule("clip_", _clip_vmap)

    def _raise_if_a_sample_is_nonfinite(tensors, dims, total: Tensor, ord: float) -> None:
        """The op's own error, before anything is written, when a sample's
        norm is NaN/inf: a clip whose coefficient is 1 writes nothing and
        raises it. Where the norms cannot be read (a traced graph, nested
        vmap) all samples are checked together: non-finite exactly when a
        sample is, but for float64 data whose samples' norms are finite
        and together pass 1.8e308 (found in review)."""
        if not _readable(total):
            torch.ops.fastclip.clip_.default(list(tensors), _NEVER_CLIPS, ord, True)
            return
        bad = torch.nonzero(~torch.isfinite(total)).flatten().tolist()
        if bad:
            sample = [t.select(d, bad[0]) for t, d in zip(tensors, dims)]
            torch.ops.fastclip.clip_.default(sample, _NEVER_CLIPS, ord, True)
            raise AssertionError("fastclip::clip_ did not refuse a non-finite norm")  # it always does

    _NEVER_CLIPS = sys.float_info.max  # min(1, max_norm / (norm + 1e-6)) is 1 for every norm
    _CLIP_EPSILON = 1e-6  # torch's, kClipEpsilon in csrc/numerics.h
