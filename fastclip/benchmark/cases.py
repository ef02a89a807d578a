"""What is timed: the cases, the methods of each case, and the check every
method passes (against a float64 reference) before it is timed.

Cases (run in this order on one gradient list; the first three leave the
gradients as they are):
  norm        the total norm alone;
  per-tensor  the total norm and each tensor's norm;
  noclip      clip_grad_norm_ with the norm below max_norm: nothing to scale;
  clip        clip_grad_norm_ with the norm above max_norm: every gradient is rescaled;
  adamw       one clipped fused AdamW step;
  adamw-noclip  one fused AdamW step with the norm below max_norm (most steps
              of a stable run): the gradients must come out untouched.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

import fastclip
from fastclip import _ops

GRAD_SEED, PARAM_SEED = 0, 1
# Workload.fingerprint: the integer type of each element size, and the
# Weyl constant (2^64 / golden ratio, as int64) that makes position weights.
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WEYL = 0x9E3779B97F4A7C15 - (1 << 64)
# The float64 reference converts this many elements at a time (8 MiB).
REF_CHUNK = 1 << 20

MAX_NORM_NOCLIP = 1e30
# Clip checks use max_norm = (current float64 norm) * CHECK_SHRINK: a
# coefficient far from 1, so that a wrong one shows.
CHECK_SHRINK = 0.5
# Each timed clip call gets a max_norm CLIP_DECAY times the previous one,
# so the coefficient is ~0.99 on every call. Clipping again and again to
# one fixed max_norm would not do: the norm converges to max_norm - 1e-6
# within a few calls, where max_norm / (norm + 1e-6) is exactly 1 and
# fastclip rightly writes nothing. 100 calls shrink the gradients by 2.7x.
CLIP_DECAY = 0.99
# Before a timed call, gradients that CLIP_DECAY has shrunk to this
# fraction of where the case's timed clips started are seeded again
# (outside the timed window) and the clips start over: with many repeats
# (--repeats 200 over a case's methods) fp16 values went subnormal, then
# zero, and a clip of zeros writes nothing (found in review). At 0.1 an
# fp16 clip case's elements stay normal but for |u| < 1e-3 of the
# uniform(-1, 1) values (0.1%), AdamW's (from 1e-2 of the seeded norm) but
# for 6%; the default repeats (125 calls per case at most) never reach it.
RESEED_SHRINK = 0.1

# Relative error allowed on a returned norm against float64. fastclip
# accumulates in float64 and returns float32; torch accumulates fp32 in fp32
# and rounds bf16/fp16 norms to that dtype: its CPU norm of the one
# 263M-element tensor of the "giant" list is 2.5% (fp32) and 2.9% (bf16)
# below float64.
NORM_RTOL = {"fastclip": 1e-6, "torch": 5e-2}

# The AdamW case clips to this fraction of the list's norm. A fixed tiny
# max_norm (1e-3, before) left fp16 gradients of large lists subnormal
# (1e-3 / sqrt(124M) = 9e-8), and every clip-then-step failed its check
# (found in review); a coefficient keeps a clipped element's size ~1e-2 in
# every dtype.
ADAMW_CLIP_COEF = 1e-2
# AdamW settings. Adam's update does not depend on the scale of the
# gradients when eps is negligible, so a wrong clip coefficient would not
# show in the parameters; eps is set to the size of one clipped gradient
# element (max_norm / sqrt(numel)) to make the update depend on it. The
# cost of a step does not depend on these values.
ADAMW_LR, ADAMW_WEIGHT_DECAY = 1e-3, 1e-2
# Parameters after a checked step may differ from the float64 reference by
# this many units of the dtype's eps (relative to |p| + lr): the fused
# kernel's float32 arithmetic and, for bf16, its bf16 optimizer state.
ADAMW_EPS_UNITS = 4
# The AdamW check compares this many leading elements of every parameter
# (all of them for most tensors of the 10,000-tensor list): enough to see a
# wrong coefficient or a skipped tensor, without float64 copies of 5 GB.
ADAMW_PROBE = 4096
# The AdamW cases hold parameters, gradients and two state tensors per
# parameter (4x the gradient bytes; their methods share one optimizer); they
# run where that fits in this fraction of the device's memory.
ADAMW_MEMORY_FRACTION = 0.25
# torch's fused AdamW runs one parallel region per tensor on the CPU: on
# 10,000 tensors a step takes 0.1-4 s on a busy 2-core machine, too long
# for --quick, which skips the AdamW case on lists longer than this.
ADAMW_QUICK_MAX_TENSORS = 1000


class Unavailable(Exception):
    """The method cannot run in this installation (missing API, no extension)."""


class Skipped(Exception):
    """The method is not run in this run (an option, a time budget, memory)."""


class Failed(Exception):
    """The method ran but failed: a result that disagrees with the float64
    reference, or a compile that did not finish in time."""


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class Workload:
    """One gradient list (one set, one dtype) and its float64 reference norms.

    Parameter storage is left uninitialized (only the gradients are read)
    until a case calls ``init_params`` (AdamW).
    """

    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    device: torch.device
    params: list[torch.nn.Parameter] = field(default_factory=list)
    ref_each: Optional[Tensor] = None  # float64, one norm per tensor, on the CPU
    ref_total: float = 0.0
    params_ready: bool = False
    adamw: Optional[torch.optim.Optimizer] = None  # see _adamw
    clip_target: float = 0.0  # the max_norm the gradients were last clipped to (see next_max_norm)
    clip_start: float = 0.0  # where the timed clips started (see reseed_if_shrunk)
    _seeded_ref: tuple = ()  # the reference of the seeded gradients

    @classmethod
    def create(cls, shapes, dtype: torch.dtype, device: torch.device) -> "Workload":
        work = cls(list(shapes), dtype, device)
        for shape in work.shapes:
            p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            p.grad = torch.empty(shape, dtype=dtype, device=device)
            work.params.append(p)
        work.fill_grads()
        return work

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]

    @property
    def nbytes(self) -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params)

    @property
    def numel(self) -> int:
        return sum(p.grad.numel() for p in self.params)

    def fill_grads(self) -> None:
        """Seeded uniform(-1, 1) gradients: the same values, and so the same
        reference (computed once), on every call."""
        gen = _generator(self.device, GRAD_SEED)
        for p in self.params:
            p.grad.uniform_(-1.0, 1.0, generator=gen)
        if not self._seeded_ref:
            self._seeded_ref = (self.update_reference(), self.ref_each)
        self.ref_total, self.ref_each = self._seeded_ref
        self.clip_target = self.clip_start = self.ref_total

    @property
    def seeded_total(self) -> float:
        """The float64 norm of the seeded gradients (fill_grads)."""
        return self._seeded_ref[0]

    def start_clips_at(self, max_norm: float) -> None:
        """The gradients were just clipped to ``max_norm``: timed clips go on from there."""
        self.clip_target = self.clip_start = max_norm

    def reseed_if_shrunk(self) -> bool:
        """Seed the gradients again, and start the timed clips over from
        where they started, when the clips have shrunk them to RESEED_SHRINK
        of that; returns whether it did."""
        if self.clip_target >= RESEED_SHRINK * self.clip_start:
            return False
        start = self.clip_start
        self.fill_grads()
        self.start_clips_at(min(start, self.ref_total))
        return True

    def next_max_norm(self) -> float:
        """max_norm for the next timed clip: CLIP_DECAY below the last one."""
        self.clip_target *= CLIP_DECAY
        return self.clip_target

    def init_params(self) -> None:
        """Seeded uniform(-1, 1) parameters (uninitialized memory may hold NaN)."""
        gen = _generator(self.device, PARAM_SEED)
        with torch.no_grad():
            for p in self.params:
                p.uniform_(-1.0, 1.0, generator=gen)
        self.params_ready = True

    def update_reference(self) -> float:
        """Recompute the float64 norms of the gradients as stored; returns the total.

        Squares of fp32/bf16/fp16 values are exact in float64, and their sum
        is a float64 dot product of float64 copies of REF_CHUNK elements at
        a time (6x faster than linalg.vector_norm with dtype=float64).
        """
        sums = []
        for g in self.grads:
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for chunk in g.detach().reshape(-1).split(REF_CHUNK):
                wide = chunk.double()
                total += torch.dot(wide, wide)
            sums.append(total)
        each = torch.stack(sums).sqrt()
        self.ref_each = each.cpu()
        self.ref_total = math.sqrt(float((self.ref_each**2).sum()))
        return self.ref_total

    def fingerprint(self) -> Tensor:
        """Each gradient's bits as integers, summed with an odd weight per
        position (int64, wrapping): a changed, moved or sign-flipped element
        changes it (found in review: the per-tensor norms compared before
        passed a negated or reversed gradient)."""
        sums = []
        for g in self.grads:
            bits = g.detach().reshape(-1).view(_INT_OF_SIZE[g.element_size()])
            total = torch.zeros((), dtype=torch.int64, device=self.device)
            for start in range(0, bits.numel(), REF_CHUNK):
                chunk = bits[start:start + REF_CHUNK].to(torch.int64)
                index = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=self.device)
                total += (chunk * (index * _WEYL | 1)).sum()
            sums.append(total)
        return torch.stack(sums).cpu()

    def seeded_grads(self):
        """The seeded gradients of fill_grads made again, a new tensor for
        each gradient in turn (the same generator calls, so the same bits)."""
        gen = _generator(self.device, GRAD_SEED)
        for p in self.params:
            yield torch.empty_like(p.grad).uniform_(-1.0, 1.0, generator=gen)

    def worst_scaled_error(self, coef: float) -> float:
        """The largest error of a gradient element relative to its seeded
        value times ``coef`` (float64), over every element of the list."""
        worst = torch.zeros((), dtype=torch.float64, device=self.device)
        tiny = torch.finfo(self.dtype).tiny
        for g, seeded in zip(self.grads, self.seeded_grads()):
            flat, flat_seeded = g.detach().reshape(-1), seeded.reshape(-1)
            for start in range(0, flat.numel(), REF_CHUNK):
                expected = flat_seeded[start:start + REF_CHUNK].double() * coef
                got = flat[start:start + REF_CHUNK].double()
                # (NaN counts as the largest error)
                error = ((got - expected).abs() / expected.abs().clamp_min(tiny)).nan_to_num(math.inf).max()
                worst = torch.maximum(worst, error)
        return float(worst)

    def probe(self, tensors: list[Tensor]) -> Tensor:
        """The first ADAMW_PROBE elements of each tensor, in float64, as one vector."""
        return torch.cat([t.detach().reshape(-1)[:ADAMW_PROBE] for t in tensors]).to("cpu", torch.float64)


def tiny_workload(like: Workload) -> Workload:
    """The same number of tensors and dtype as ``like``, one element each:
    what a method costs beyond streaming the bytes (its host overhead)."""
    return Workload.create([(1,)] * len(like.shapes), like.dtype, like.device)


# ------------------------------------------------------------------ methods
Call = Callable[[float], object]  # called with max_norm; returns the method's result


@dataclass
class Method:
    name: str
    family: str  # "torch" or "fastclip": which norm tolerance applies
    build: Callable[[Workload], Call]  # raises Unavailable
    compiled: bool = False  # runs under the compile time limit; no host-overhead list


def _torch_util(name: str):
    fn = getattr(torch.nn.utils, name, None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.utils.{name}")
    return fn


def _fastclip_op(name: str, work: Workload):
    """The typed wrapper of ``torch.ops.fastclip.<name>``, if it can run on ``work``'s device."""
    if not _ops.available():
        raise Unavailable(f"the fastclip extension is not loaded ({_ops.import_error()})")
    if not _ops.has_kernel(work.device.type):
        raise Unavailable(f"this build of fastclip has no {work.device.type} kernels")
    return getattr(_ops, name)


def _clipped_optimizer_class():
    cls = getattr(fastclip, "ClippedOptimizer", None)
    if cls is None:
        raise Unavailable(f"fastclip {fastclip.__version__} has no ClippedOptimizer")
    return cls


def _torch_per_tensor(grads: list[Tensor], foreach: bool) -> tuple[Tensor, Tensor]:
    if foreach:
        each = torch.stack(torch._foreach_norm(grads))
    else:
        each = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    return torch.linalg.vector_norm(each.float()), each


def _norm_methods() -> list[Method]:
    def torch_norm(foreach: bool):
        def build(w):
            fn, grads = _torch_util("get_total_norm"), w.grads
            return lambda m: fn(grads, foreach=foreach)

        return build

    def op(w):
        fn, grads = _fastclip_op("multi_tensor_norm", w), w.grads
        return lambda m: fn(grads, 2.0, False)[0]

    return [
        Method("torch foreach", "torch", torch_norm(True)),
        Method("torch loop", "torch", torch_norm(False)),
        Method("fastclip", "fastclip", lambda w: lambda m, grads=w.grads: fastclip.get_total_norm(grads)),
        Method("fastclip op", "fastclip", op),
    ]


def _per_tensor_methods() -> list[Method]:
    def op(w):
        fn, grads = _fastclip_op("multi_tensor_norm", w), w.grads
        return lambda m: fn(grads, 2.0, True)

    return [
        Method("torch foreach", "torch", lambda w: lambda m, g=w.grads: _torch_per_tensor(g, True)),
        Method("torch loop", "torch", lambda w: lambda m, g=w.grads: _torch_per_tensor(g, False)),
        Method("fastclip", "fastclip", lambda w: lambda m, p=w.params: fastclip.grad_norms(p)),
        Method("fastclip op", "fastclip", op),
    ]


def _clip_methods(compiled_clip: Callable[[Workload], Call]) -> list[Method]:
    def torch_clip(foreach: bool):
        def build(w):
            fn, params = _torch_util("clip_grad_norm_"), w.params
            return lambda m: fn(params, m, foreach=foreach)

        return build

    def op(w):
        fn, grads = _fastclip_op("clip_", w), w.grads
        return lambda m: fn(grads, m, 2.0)

    return [
        Method("torch foreach", "torch", torch_clip(True)),
        Method("torch loop", "torch", torch_clip(False)),
        Method("torch compile", "torch", compiled_clip, compiled=True),
        Method("fastclip", "fastclip", lambda w: lambda m, p=w.params: fastclip.clip_grad_norm_(p, m)),
        Method("fastclip op", "fastclip", op),
    ]


def _adamw_max_norm(w: Workload) -> float:
    """The AdamW case's max_norm: ADAMW_CLIP_COEF times the seeded gradients' norm."""
    return ADAMW_CLIP_COEF * w.seeded_total


def _adamw_eps(w: Workload) -> float:
    return _adamw_max_norm(w) / math.sqrt(w.numel)


def _adamw(w: Workload) -> torch.optim.Optimizer:
    """The list's one fused AdamW, shared by the AdamW methods (each check
    starts it from empty state, see AdamWCase.prepare): the methods are timed
    in rounds, all alive at once, and one optimizer's state per method would
    need 10x the gradient bytes instead of 4x. The cost of a step does not
    depend on the state's values."""
    if w.adamw is None:
        w.adamw = torch.optim.AdamW(w.params, lr=ADAMW_LR, weight_decay=ADAMW_WEIGHT_DECAY, eps=_adamw_eps(w), fused=True)
    return w.adamw


def _adamw_methods() -> list[Method]:
    def alone(w):
        opt = _adamw(w)
        return lambda m: opt.step()

    def clip_then_step(clip):
        def build(w):
            opt, params = _adamw(w), w.params

            def call(m):
                norm = clip(params, m)
                opt.step()
                return norm

            return call

        return build

    def wrapper(w):
        opt = _clipped_optimizer_class()(_adamw(w), max_norm=_adamw_max_norm(w))

        def call(m):
            opt.max_norm = m  # the same decaying max_norm the other methods clip to
            opt.step()
            return opt.last_norm

        def verify():
            # The check is a first step (host decision); timed steps with
            # state skip through found_inf on a GPU, a path the check does
            # not take: a wrongly skipped step would move no memory (found
            # in review).
            skipped = int(opt.skipped_steps)
            if skipped:
                raise Failed(f"{skipped} timed steps were skipped: they did not update the parameters")

        call.verify = verify
        return call

    torch_clip = lambda params, m: torch.nn.utils.clip_grad_norm_(params, m, foreach=True)  # noqa: E731
    return [
        Method("adamw alone", "torch", alone),
        Method("torch foreach+adamw", "torch", clip_then_step(torch_clip)),
        Method("fastclip+adamw", "fastclip", clip_then_step(fastclip.clip_grad_norm_)),
        Method("ClippedOptimizer", "fastclip", wrapper),
    ]


# -------------------------------------------------------------------- cases
def _rel(value: float, ref: float) -> float:
    return abs(value - ref) / ref if ref != 0.0 else abs(value)


def _check_total(method: Method, returned, ref: float) -> float:
    error = _rel(float(returned), ref)
    if not error <= NORM_RTOL[method.family]:  # also catches NaN
        raise Failed(f"returned norm {float(returned):.7g}, float64 norm {ref:.7g}")
    return error


@dataclass
class Case:
    """One thing to time; ``check`` runs one call and compares it with float64."""

    name: str
    floor: str  # key of the floor it is compared with (see timing.Floors)
    baseline: str  # the method speedups are relative to
    methods: list[Method]  # every one is checked before any is timed (the runner times them in rounds)

    def prepare(self, work: Workload) -> None:
        """Bring ``work`` to the state each method's check starts from."""

    def timed_max_norm(self, work: Workload) -> float:
        """max_norm for the next timed call."""
        return MAX_NORM_NOCLIP

    def check(self, method: Method, call: Call, work: Workload) -> Optional[float]:
        """One call on ``work``, compared with float64; returns the relative
        error of the returned norm (None when the method returns none)."""
        return _check_total(method, call(MAX_NORM_NOCLIP), work.ref_total)


class PerTensorCase(Case):
    def check(self, method, call, work):
        total, each = call(MAX_NORM_NOCLIP)
        error = _check_total(method, total, work.ref_total)
        each = each.detach().to("cpu", torch.float64)
        worst = float(((each - work.ref_each).abs() / work.ref_each).max())
        if not worst <= NORM_RTOL[method.family]:
            raise Failed(f"a per-tensor norm is off by {worst:.2e} relative to float64")
        return max(error, worst)


class NoClipCase(Case):
    def check(self, method, call, work):
        before = work.fingerprint()
        error = _check_total(method, call(MAX_NORM_NOCLIP), work.ref_total)
        if not torch.equal(work.fingerprint(), before):
            raise Failed("the gradients changed although no clipping was needed")
        return error


class ClipCase(Case):
    """Each check clips the seeded gradients to half their norm and
    compares every element with its seeded value times the coefficient, in
    float64. Timed calls then clip by CLIP_DECAY per call, going on from
    the last check's result across methods, so every method is checked
    before any is timed."""

    def prepare(self, work):
        work.fill_grads()  # every check clips the seeded gradients, which it can make again to compare

    def timed_max_norm(self, work):
        return work.next_max_norm()

    def check(self, method, call, work):
        before = work.ref_total
        max_norm = before * CHECK_SHRINK
        returned = call(max_norm)
        work.start_clips_at(work.update_reference())  # where the timed calls go on from
        error = _check_total(method, returned, before)
        coef = max_norm / (before + 1e-6)
        # Every element, not a norm: a few tensors left unscaled moved a
        # bf16 total by less than its tolerance (found in review: 10 of
        # 10,000), and 0.5% of every tensor's elements unscaled moved each
        # tensor's bf16 norm by less (found in review). The method's
        # coefficient is within its norm's tolerance of this one, and the
        # product is rounded once to the gradient's dtype: a norm off by r
        # makes a coefficient off by up to r / (1 - r) (found in review: a
        # torch norm 4.8% low, within its tolerance, failed this check).
        r = NORM_RTOL[method.family]
        tolerance = r / (1.0 - r) + torch.finfo(work.dtype).eps
        worst = work.worst_scaled_error(coef)
        if not worst <= tolerance:
            raise Failed(f"an element after clipping is off by {worst:.2e} relative to its value times {coef:.7g}")
        return error


class AdamWCase(Case):
    """Each method starts from the seeded gradients and empty optimizer state; its
    first step (clipping to _adamw_max_norm) is compared, on the first
    ADAMW_PROBE elements of every parameter, with AdamW's first step in
    float64, which has a closed form: p = p0 (1 - lr wd) - lr g / (|g| + eps),
    with g the clipped gradient (after bias correction, m and v are g and g^2).
    Timed steps clip by CLIP_DECAY per step, from _adamw_max_norm down."""

    def prepare(self, work):
        if not work.params_ready:
            work.init_params()
        work.fill_grads()
        if work.adamw is not None:
            work.adamw.state.clear()  # the next step is a first step again

    def timed_max_norm(self, work):
        return work.next_max_norm()

    def check(self, method, call, work):
        p0, g0 = work.probe(work.params), work.probe(work.grads)
        max_norm = _adamw_max_norm(work)
        result = call(max_norm)
        work.start_clips_at(max_norm)
        error = _check_total(method, result, work.ref_total) if result is not None else None
        coef = 1.0 if method.name == "adamw alone" else min(1.0, max_norm / (work.ref_total + 1e-6))
        _check_adamw_step(method, work, p0, g0, coef)
        return error


class AdamWNoClipCase(AdamWCase):
    """AdamWCase with the norm below max_norm: the step on the gradients as
    they are, which every method must leave bit-identical."""

    def timed_max_norm(self, work):
        return MAX_NORM_NOCLIP

    def check(self, method, call, work):
        before = work.fingerprint()
        p0, g0 = work.probe(work.params), work.probe(work.grads)
        result = call(MAX_NORM_NOCLIP)
        if not torch.equal(work.fingerprint(), before):
            raise Failed("the gradients changed although no clipping was needed")
        _check_adamw_step(method, work, p0, g0, coef=1.0)
        return _check_total(method, result, work.ref_total) if result is not None else None


def _check_adamw_step(method: Method, work: Workload, p0: Tensor, g0: Tensor, coef: float) -> None:
    """The probed parameters against AdamW's first step in float64 on ``coef * g0``."""
    g = g0 * coef
    ref = p0 * (1.0 - ADAMW_LR * ADAMW_WEIGHT_DECAY) - ADAMW_LR * g / (g.abs() + _adamw_eps(work))
    allowed = ADAMW_EPS_UNITS * torch.finfo(work.dtype).eps * (p0.abs() + ADAMW_LR)
    allowed += ADAMW_LR * NORM_RTOL[method.family]
    excess = (work.probe(work.params) - ref).abs() - allowed
    if not bool((excess <= 0).all()):  # also catches NaN
        raise Failed(f"parameters after one step differ from the float64 AdamW step (by {float(excess.max()):.2e})")


def adamw_blocker(work: Workload, quick: bool) -> Optional[str]:
    """Why the AdamW case does not run on this list, or None."""
    if quick and len(work.shapes) > ADAMW_QUICK_MAX_TENSORS:
        return f"--quick runs the AdamW case on lists of at most {ADAMW_QUICK_MAX_TENSORS} tensors"
    if work.device.type == "cuda":
        memory = torch.cuda.get_device_properties(work.device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = 4 * work.nbytes
    if need > ADAMW_MEMORY_FRACTION * memory:
        return (
            f"needs {need / 1e9:.1f} GB for parameters, gradients and AdamW state, "
            f"over {ADAMW_MEMORY_FRACTION:.0%} of the {memory / 1e9:.0f} GB of {work.device.type} memory"
        )
    return None


def make_cases(compiled_clip: Callable[[Workload], Call]) -> list[Case]:
    """All cases in run order; ``compiled_clip`` builds the torch.compile method."""
    return [
        Case("norm", "read", "torch foreach", _norm_methods()),
        PerTensorCase("per-tensor", "read", "torch foreach", _per_tensor_methods()),
        NoClipCase("noclip", "read", "torch foreach", _clip_methods(compiled_clip)),
        ClipCase("clip", "read+scale", "torch foreach", _clip_methods(compiled_clip)),
        AdamWCase("adamw", "read+adamw", "torch foreach+adamw", _adamw_methods()),
        AdamWNoClipCase("adamw-noclip", "read+adamw", "torch foreach+adamw", _adamw_methods()),
    ]


CASES = [case.name for case in make_cases(lambda work: None)]
