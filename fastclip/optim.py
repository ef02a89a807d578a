"""``ClippedOptimizer``: gradient clipping folded into any optimizer's step.

    opt = fastclip.ClippedOptimizer(torch.optim.AdamW(params, fused=True), max_norm=1.0)
    loss.backward(); opt.step(); opt.zero_grad()

``step()`` takes the global norm of every gradient of every param group in
one fused pass, then lets the inner optimizer step on the clipped gradients.
The arithmetic on scalars between the two (coefficient, divisor, skip flag,
logs, skip count) is one op, ``clip_scalars_``: one launch on a GPU where
it took 21 small ones as 0-dim torch operations.
How the clip reaches the gradients depends on the inner optimizer:

* fused (torch's ``fused=True`` Adam, AdamW, SGD, Adagrad: they set
  ``_step_supports_amp_scaling`` and divide every gradient by a float32
  ``grad_scale`` tensor, skipping the update where ``found_inf`` is 1): the
  divisor ``1 / coef`` and the non-finite flag are handed to that kernel, so
  clipping costs one read of the gradients for the norm and nothing else
  of ours; no host sync. On the CPU, where the host reads it for free, a
  divisor of exactly 1 (no clipping, no loss scale) is not handed over:
  torch's fused kernels would divide every gradient by it and write it back.
  Not folded (the plain path) while step pre-hooks run inside the inner
  step (they must see the clipped gradients) or a group has ``fused=False``.
* any other optimizer: the fastclip scale op rescales the gradients first
  (no memory traffic when the coefficient is 1), then the inner step runs.

Non-finite gradients (``nonfinite=``):
  ``"skip"``       (default) the step leaves parameters and optimizer state
                   bit-identical and ``skipped_steps`` (a device tensor) counts
                   it. With a fused inner optimizer that already has state,
                   or keeps none (SGD without momentum), this happens on the
                   device through ``found_inf``; otherwise it costs one host
                   read of a flag per step.
  ``"error"``      raise a RuntimeError naming the first non-finite
                   parameter (by name when the optimizer was built from
                   ``named_parameters()``) before anything is modified; one
                   host read per step.
  ``"propagate"``  torch's ``clip_grad_norm_`` then ``step()`` (up to the
                   rounding of the norm, which fastclip accumulates in
                   float64): the NaN/inf spreads into the update. No host read.

AMP: under ``torch.amp.GradScaler`` the wrapper takes the scaler's
``grad_scale``/``found_inf`` when the inner optimizer is fused (the scaler
sets them on the wrapper, as it does on any optimizer that supports AMP
scaling): the norm of the still-scaled gradients is divided by the scale,
a scalar operation, and the product of the scale and ``1 / coef`` becomes
the inner kernel's divisor, so unscaling and clipping ride the optimizer's
own pass (the norm is taken in float64: the scaled gradients' norm may
exceed float32's range while the unscaled one is small; where the divisor
itself exceeds it, the step is skipped). Steps the scaler finds inf in are skipped whatever ``nonfinite``
says, as the scaler requires. For other optimizers the scaler unscales as
usual (``scaler.step`` or ``scaler.unscale_``) and the wrapper clips the
unscaled gradients.
"""
from __future__ import annotations

import copy
import inspect
import math
from itertools import chain
import weakref
from typing import Any, Callable, Optional

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import _fallback, _ops
from ._version import torch_release
from . import clip as _clip

__all__ = ["ClippedOptimizer"]

_POLICIES = ("skip", "error", "propagate")
# Attributes through which torch's fused optimizers read a gradient divisor
# and a skip flag (the contract GradScaler uses).
_SCALE_ATTRS = ("grad_scale", "found_inf")

# On the CPU the host reads the step's scalars at no cost (no device to
# wait for), so there it decides what the device path leaves to the fused
# kernel. A divisor of exactly 1 is not handed over: torch's fused kernels
# divide every gradient by ``grad_scale`` and write it back (fused AdamW,
# GPT-2 shapes, 2 threads: bf16 69.1-69.8 -> 59.3-60.1 ms per step; the
# division by 1 is exact, so parameters and state get the same bits). A
# finite step gets no ``found_inf``: it costs torch's fused step a foreach
# subtraction over every state step (66 us per step on 161 tensors). Tests
# of the device path turn this off to run that path on the CPU.
_CPU_HOST_DECIDES = True

# Whether dynamo traces the attribute assignments to the inner optimizer
# that hand it the divisor after a graph break: torch 2.11's stops on them
# with an AssertionError (no AttributeMutation; 2.6, 2.12 and 2.13 trace
# them, 2.7-2.10 untested), so before 2.12 that handoff and the fused step
# run outside the graph.
_DYNAMO_SETS_OPTIMIZER_ATTRS = torch_release(torch.__version__) >= (2, 12)


def _host_decides(total: Tensor) -> bool:
    """True where the host reads ``total`` (the fused divisor) for free: the CPU, eager."""
    return _CPU_HOST_DECIDES and total.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_fake(total)


def _is_fake(t: Tensor) -> bool:
    """``t`` has no data to read: a FakeTensor (FakeTensorMode, as memory
    estimators run a step; found in review: the step's reads of its flag
    raised there, where torch's clip-then-step runs)."""
    return not torch.compiler.is_compiling() and isinstance(t, FakeTensor)  # not is_fake(): 40x the cost


def _scalar_on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """A scale or flag where clip_scalars_ reads it: on the norm's device, in a dtype it reads."""
    if t is None or (t.device == device and t.dtype in _clip._KERNEL_DTYPES):
        return t
    return t.to(device, t.dtype if t.dtype in _clip._KERNEL_DTYPES else torch.float64)


def _positive_max_norm(max_norm) -> float:
    what = "a finite number > 0"
    value = _clip._as_float(max_norm, "max_norm", what)  # TypeError for None, as torch's float()
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"max_norm must be {what}, got {max_norm!r}")
    return value


def _filled(entry: Optional[dict]) -> bool:
    """An optimizer state entry a step continues from: not missing or empty,
    and no momentum buffer of None (torch's SGD then starts it afresh, the
    fused one from uninitialized memory)."""
    return bool(entry) and entry.get("momentum_buffer", True) is not None


def _all_finite(grad: Tensor) -> bool:
    """No NaN or inf among the values ``grad`` holds (sparse: its stored
    values, summed where an index repeats, as its norm sums them; found in
    review: ``torch.isfinite`` has no sparse kernel)."""
    if grad.layout == torch.sparse_coo:
        grad = grad.coalesce().values()
    elif grad.layout != torch.strided:
        grad = grad.values()
    return bool(torch.isfinite(grad).all())


def _policy(nonfinite) -> str:
    if nonfinite not in _POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, _POLICIES))}, got {nonfinite!r}")
    return nonfinite


def _folds(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step`` reads ``grad_scale``/``found_inf`` attributes.

    That is torch's contract for optimizers that set
    ``_step_supports_amp_scaling``; optimizers of the older contract take a
    ``grad_scaler`` keyword instead and are treated as non-fused.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    # A group that opts out of the fused kernel (``fused=False`` in a fused
    # optimizer) takes the plain step, which refuses a divisor (found in
    # review: AssertionError from torch's AdamW).
    if any("fused" in group and not group["fused"] for group in optimizer.param_groups):
        return False
    step = optimizer.step
    key = getattr(step, "__func__", None)  # a bound method's function: one per class
    if key is None or torch.compiler.is_compiling():
        return _takes_no_grad_scaler(step)
    # Cached: inspect.signature cost 56 us of every step (161 tensors, CPU).
    try:
        folds = _FOLDS_BY_STEP.get(key)
        if folds is None:
            folds = _FOLDS_BY_STEP[key] = _takes_no_grad_scaler(step)
    except TypeError:  # a function object without weak references (found in review)
        folds = _takes_no_grad_scaler(step)
    return folds


_FOLDS_BY_STEP: "weakref.WeakKeyDictionary[Callable, bool]" = weakref.WeakKeyDictionary()


def _has_step_pre_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """True when step pre-hooks run inside ``optimizer.step``: they must see
    the clipped gradients, as after ``clip_grad_norm_`` (found in review:
    with the clip folded into a fused step they saw them unclipped, and what
    they added was divided by the clip)."""
    own = getattr(optimizer, "_optimizer_step_pre_hooks", None)
    return bool(own) or bool(getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None))


def _takes_no_grad_scaler(step: Callable) -> bool:
    try:
        return "grad_scaler" not in inspect.signature(step).parameters
    except (TypeError, ValueError):
        return False


class _CalledWith:
    """``hook`` as the inner optimizer calls it, given ``optimizer`` in place of the inner one."""

    def __init__(self, hook: Callable, optimizer: torch.optim.Optimizer) -> None:
        self.hook = hook
        self.optimizer = optimizer

    def __call__(self, _inner: torch.optim.Optimizer, *args):
        return self.hook(self.optimizer, *args)


# torch's optimizers whose ``fused=True`` sets ``_step_supports_amp_scaling``.
_FUSED_CLASSES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def _pickling_lost_fused(optimizer: torch.optim.Optimizer) -> bool:
    """True for a fused torch optimizer that lost ``_step_supports_amp_scaling``
    when pickled or deep-copied (its ``__getstate__`` keeps only defaults,
    state and param groups)."""
    return (
        type(optimizer) in _FUSED_CLASSES
        and bool(optimizer.defaults.get("fused"))
        and "_step_supports_amp_scaling" not in optimizer.__dict__
    )


class ClippedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that every ``step()`` first clips the global gradient norm.

    Args:
        optimizer: any ``torch.optim.Optimizer``. Its ``param_groups``,
            ``state``, ``defaults`` and ``state_dict()`` are the wrapper's:
            LR schedulers, checkpoints and ``add_param_group`` work on either.
        max_norm: clip threshold, a finite number > 0; may be changed between
            steps (``opt.max_norm = 0.5``).
        norm_type: order of the norm: 2, 1, ``inf`` or any finite p > 0.
        nonfinite: ``"skip"``, ``"error"`` or ``"propagate"`` (see the module doc).
        process_group: a group or a sequence of groups over which the
            parameters are spread (as for ``fastclip.clip_grad_norm_``); the
            norm is global and every rank takes the same decision. DTensor
            parameters (FSDP2) are reduced over their mesh without it.

    ``last_norm`` is the total gradient norm before clipping of the last
    step (float32 device tensor; what torch's ``clip_grad_norm_`` returns,
    accumulated in float64), ``last_clip_coef`` the coefficient
    ``min(1, max_norm / (norm + 1e-6))`` (computed from the float64 norm)
    and ``skipped_steps`` counts the steps this wrapper skipped (int64
    device tensor). They are 0, 1 and 0 before the first step, and the same
    tensors are updated in place by every step (``clone()`` a value to
    keep it): dynamo drops attribute assignments made inside an
    optimizer's compiled ``step``, but keeps in-place updates.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_norm: float,
        norm_type: float = 2.0,
        nonfinite: str = "skip",
        process_group=None,
    ) -> None:
        if isinstance(optimizer, ClippedOptimizer):
            raise TypeError("optimizer is already a ClippedOptimizer; wrap the inner optimizer once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("optimizer: LBFGS re-evaluates its closure inside step() and cannot be clipped before it")
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.nonfinite = nonfinite
        self.process_group = process_group
        _clip._distributed.groups_of(process_group)  # validated now, read again at each step
        device = next((p.device for group in optimizer.param_groups for p in group["params"]), torch.device("cpu"))
        self._new_logs(device)
        # The hook tables and the step patch Optimizer.__init__ would set up;
        # param_groups/state/defaults stay the inner optimizer's (properties below).
        self.__setstate__({})

    # ------------------------------------------------ shared with the inner optimizer
    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.__dict__.pop("_state_verdict", None)
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.optimizer.defaults = value

    @property
    def max_norm(self) -> float:
        return self._max_norm

    @max_norm.setter
    def max_norm(self, value: float) -> None:
        self._max_norm = _positive_max_norm(value)

    # Checked when set, as max_norm (found in review: a later "raise" for
    # "error" was taken as "skip", a bad norm_type failed in the kernel).
    @property
    def norm_type(self) -> float:
        return self._norm_type

    @norm_type.setter
    def norm_type(self, value: float) -> None:
        self._norm_type = _clip._norm_type(value)

    @property
    def nonfinite(self) -> str:
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        self._nonfinite = _policy(value)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler then hands its scale and inf flag to step() instead of
        # unscaling the gradients itself; the wrapper folds both into the inner kernel.
        return _folds(self.optimizer)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.pop("_state_verdict", None)
        self.optimizer.load_state_dict(state_dict)

    # State-dict hooks live on the inner optimizer, whose state_dict() runs
    # them; one registered on the wrapper is called with the wrapper.
    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_pre_hook(_CalledWith(hook, self), prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_post_hook(_CalledWith(hook, self), prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_pre_hook(_CalledWith(hook, self), prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_post_hook(_CalledWith(hook, self), prepend)

    def __getattr__(self, name: str):
        # Public attributes of the inner optimizer that the wrapper does not
        # define (train()/eval() of schedule-free optimizers). Private and
        # special names are not forwarded: copy, pickle and torch probe
        # them; nor is GradScaler's contract (grad_scale, found_inf), which
        # it reads on the wrapper and would multiply in twice (found in review).
        inner = self.__dict__.get("optimizer")
        if inner is not None and not name.startswith("_") and name not in _SCALE_ATTRS:
            try:
                return getattr(inner, name)
            except AttributeError:
                pass
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __deepcopy__(self, memo: dict) -> "ClippedOptimizer":
        # Process groups are handles of this run, as devices are: a copy
        # shares them (found in review: deepcopy failed on a ProcessGroup).
        for group in _clip._distributed.groups_of(self.process_group):
            memo[id(group)] = group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self._state(), memo))
        return copied

    def __copy__(self) -> "ClippedOptimizer":
        copied = type(self).__new__(type(self))
        copied.__setstate__(self._state())  # the same inner optimizer, logs and groups
        return copied

    def __getstate__(self) -> dict:
        if self.process_group is not None:
            raise TypeError(
                "ClippedOptimizer with a process_group cannot be pickled (a process group belongs to this run): "
                "save state_dict(), or set process_group to None before pickling and again after loading"
            )
        return self._state()

    def _state(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "_max_norm": self._max_norm,
            "norm_type": self._norm_type,  # the public names: pickles load in earlier versions too
            "nonfinite": self._nonfinite,
            "process_group": self.process_group,
            "last_norm": self.last_norm,
            "last_clip_coef": self.last_clip_coef,
            "skipped_steps": self.skipped_steps,
        }

    def __setstate__(self, state: dict) -> None:
        # Optimizer.__setstate__ (re)creates the hook tables and patches step;
        # its defaults fix-up goes through the property to the inner optimizer.
        # norm_type and nonfinite are checked properties over these attributes.
        state = {("_" + k if k in ("norm_type", "nonfinite") else k): v for k, v in state.items()}
        super().__setstate__(state)
        inner = self.__dict__.get("optimizer")
        if inner is not None and _pickling_lost_fused(inner):
            # What the fused optimizer's __init__ sets and torch's pickling
            # drops: without it a copied wrapper no longer folds the clip.
            inner._step_supports_amp_scaling = True
        # A wrapper pickled by an earlier version before its first step has
        # no logs yet (None): they are tensors from construction on now.
        logs = (self.__dict__.get("last_norm"), self.__dict__.get("last_clip_coef"), self.__dict__.get("skipped_steps"))
        if "optimizer" in self.__dict__ and any(log is None for log in logs):
            device = next((t.device for t in logs if t is not None), None) or next(
                (p.device for group in self.optimizer.param_groups for p in group["params"]), torch.device("cpu")
            )
            self._new_logs(device)
            for name, log in zip(("last_norm", "last_clip_coef", "skipped_steps"), logs):
                if log is not None:
                    getattr(self, name).copy_(log)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"ClippedOptimizer(max_norm={self._max_norm}, norm_type={self.norm_type}, "
            f"nonfinite={self.nonfinite!r},\n{inner}\n)"
        )

    # ----------------------------------------------------------------- step
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Clip the gradients' global norm, then step the inner optimizer.

        A closure is evaluated once (with grad enabled) before clipping.
        Returns the closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        held = _clip._held(params, True, "parameters")
        groups = _clip._distributed.groups_of(self.process_group)
        if held is not None and held.one_call and not groups:
            grads, one_call = None, True  # the fast path: the ops are called on `held`
        else:
            grads, one_call = _clip._grads(params, held)
            held = None
            if len(grads) == 0 and not groups:
                # No gradient: the norm torch's clip_grad_norm_ returns for none.
                self.last_norm.zero_()
                self.last_clip_coef.fill_(1.0)
                self.optimizer.step()
                return loss
        divisor, scaler_found = self._incoming_scale()
        spread = None  # (sharding, groups) of a norm over several processes
        with torch.no_grad():
            # The norm in float64 (found in review: the float32 one made
            # the coefficient of fp64 gradients inexact, and under a large
            # loss scale overflowed although the unscaled norm was small).
            if held is not None:
                raw, _ = held.norm(self.norm_type, False, True)
            elif _clip._needs_global(grads, one_call, groups):
                # Each rank's norm is unscaled by its own loss scale before the
                # reduction, and a rank whose scaler found inf makes the global
                # norm inf, so every rank skips that step (found in review: a
                # GradScaler whose inf check is per rank left the ranks with
                # different scales, and the norm reduced before the division
                # came out different and wrong on each; a step skipped on one
                # rank only was taken on the others).
                # This rank's gradients are written unless the step folds.
                raw, _, grads, sharding, held = _clip._global_norms(
                    grads, self.norm_type, False, groups, "parameters", divisor, scaler_found,
                    writes=lambda local, local_held: not self._folds_on(local, local_held),
                )
                spread = (sharding, groups)
                if divisor is not None:
                    raw = raw * divisor.reshape(()).to(raw.device, torch.float64)  # clip_scalars_ divides again
                one_call = held is not None or (len(grads) > 0 and _clip._one_call(grads))
            else:
                raw, _ = _clip._norms(grads, self.norm_type, False, one_call, fp64=True)
        inner = self.optimizer
        folds = self._folds_on(grads, held)
        # A divisor and flag the inner optimizer already carries (set by its
        # user) stay in force for a fused step.
        saved = {name: inner.__dict__[name] for name in _SCALE_ATTRS if name in inner.__dict__} if folds else {}
        policy = "skip" if scaler_found is not None else self.nonfinite
        # A found_inf the user set on the fused inner optimizer: under "skip"
        # it joins the wrapper's flag (and the count); otherwise it is the
        # inner step's own, which it skips as the bare step does, while
        # `nonfinite` applies to the norm alone (found in review: merged
        # into the norm's flag, "propagate" stepped and "error" raised; and
        # forcing "skip" made the policy, and the collectives, depend on
        # whether each rank's step folds).
        user_found = saved.get("found_inf") if policy == "skip" else None
        # Where the host reads the flag for free, the state check (a lookup
        # per parameter) waits for a non-finite step (see _fused_step).
        on_device = folds and policy == "skip" and not _host_decides(raw) and self._has_state()
        # Over several processes the skip is decided alike everywhere: the
        # flag also holds this rank's fused divisor beyond float32 (its loss
        # scale is its own) and its own inner found_inf, so every rank takes
        # the largest flag, one more collective of one value (found in
        # review: one rank skipped, or raised, where another stepped).
        # Only a fused inner optimizer's flags can differ (the loss scale's
        # flag is in the global norm): `_folds` reads the optimizer alone,
        # so every rank with the same kind of inner optimizer agrees on it.
        agree = spread is not None and policy != "propagate" and _folds(inner)
        factor, total, found = self._scalars(
            raw, divisor, saved.get("grad_scale"), scaler_found, user_found,
            skip_inf_divisor=folds and policy != "propagate", count_skip=on_device and not agree,
        )
        if agree:
            found = _clip._distributed.any_rank(found, *spread)
            if on_device:
                self.skipped_steps.add_(found.to(torch.int64))  # as clip_scalars_ counts
        if folds and torch.compiler.is_compiling() and not _DYNAMO_SETS_OPTIMIZER_ATTRS:
            # Outside the graph: the fused inner step and its hooks run
            # eagerly, with the host decisions of an eager step.
            torch.compiler.disable(type(self)._fused_step)(self, total, found, policy, saved, on_device)
        elif folds:
            self._fused_step(total, found, policy, saved, on_device)
        else:
            self._plain_step(held, grads, one_call, factor, found, policy)
        return loss

    def _folds_on(self, grads: list[Tensor], held) -> bool:
        """True when the step folds the clip into the fused inner step for
        these gradients (``held``: the same, gathered in C++ for one op
        call, or None). Not across device types (found in review): torch's
        fused step takes a GPU divisor and flag to the CPU with a copy it
        does not wait for, and its CPU kernel reads them at once. `held` is
        on one device."""
        inner = self.optimizer
        return _folds(inner) and not _has_step_pre_hooks(inner) and (
            held.dense_and_apart if held is not None
            else _ops.dense_and_apart(grads) and len({g.device.type for g in grads}) == 1
        )

    def _scalars(
        self, raw: Tensor, loss_scale: Optional[Tensor], extra_scale: Optional[Tensor], found_inf: Optional[Tensor],
        extra_found: Optional[Tensor], skip_inf_divisor: bool, count_skip: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The step's scalars from the float64 norm ``raw`` (one kernel, see
        ``clip_scalars_``): the logs are written, and with ``count_skip`` a
        skipped step is counted on the device. Returns the factor for an
        unfused step, the divisor for a fused one and the skip flag."""
        device = raw.device
        if self.last_norm.device != device or self.last_norm.dtype != torch.float32:
            # The parameters moved (the count moves with them), or logs of a
            # wrapper pickled under another default dtype.
            skipped = self.skipped_steps.to(device)
            self._new_logs(device)
            self.skipped_steps.copy_(skipped)
        scalars = [_scalar_on(t, device) for t in (loss_scale, extra_scale, found_inf, extra_found)]
        # While dynamo traces, the same arithmetic in torch ops: the op's float
        # max_norm made a graph per value of a changing max_norm (found in
        # review); in tensor arithmetic it becomes dynamic after one recompile.
        kernel = device.type in _clip._KERNEL_DEVICES and not torch.compiler.is_compiling()
        impl = _ops if kernel else _fallback
        with torch.no_grad():
            return impl.clip_scalars_(
                raw, self._max_norm, *scalars, skip_inf_divisor,
                self.last_norm, self.last_clip_coef, self.skipped_steps, count_skip,
            )

    def _incoming_scale(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The gradient divisor and inf flag a GradScaler (or the user) set on the wrapper."""
        divisor = self.__dict__.get("grad_scale")
        found = self.__dict__.get("found_inf")
        if divisor is not None and not isinstance(divisor, Tensor):
            divisor = torch.tensor(float(divisor), dtype=torch.float32, device="cpu")
        return divisor, found

    def _new_logs(self, device: torch.device) -> None:
        self.last_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.last_clip_coef = torch.ones((), dtype=torch.float32, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    def _check_finite(self, found: Tensor, policy: str) -> bool:
        """One host read of the flag; raise under "error". True when the step may go on."""
        if policy == "propagate" or _is_fake(found) or not bool(found.item()):
            return True  # (fake: no flag to read, the step goes on as for finite gradients)
        if policy == "error":
            raise RuntimeError(self._nonfinite_message())
        self.skipped_steps.add_(1)
        return False

    def _nonfinite_message(self) -> str:
        for g, group in enumerate(self.optimizer.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # DTensor: this rank's shard
                if grad is not None and not _all_finite(grad):
                    where = repr(names[i]) if names is not None else f"param_groups[{g}]['params'][{i}]"
                    return (
                        f"ClippedOptimizer: the gradient of parameter {where} is non-finite "
                        f"(total norm of order {self.norm_type} is {self.last_norm.item()}); "
                        "nothing was modified. Pass nonfinite='skip' to skip such steps."
                    )
        return (
            f"ClippedOptimizer: the total gradient norm of order {self.norm_type} is "
            f"{self.last_norm.item()}: the non-finite gradient is on another rank, or the gradients "
            "are finite but the clip cannot be taken: their norm over max_norm (times a loss scale) "
            "exceeds float32's range, which the fused inner optimizer's float32 divisor cannot hold; "
            "nothing was modified."
        )

    def _stateless(self, group: dict) -> bool:
        """SGD without momentum keeps no state for the group's parameters: a
        step skipped through ``found_inf`` leaves nothing behind, so even a
        first step can be skipped on the device."""
        return isinstance(self.optimizer, torch.optim.SGD) and group.get("momentum", 0) == 0

    def _has_state(self) -> bool:
        """True when every parameter with a gradient has optimizer state or
        never gets any (a group of SGD without momentum).

        torch's fused SGD allocates its momentum buffers uninitialized on the
        first step and keeps them even when ``found_inf`` skips the update, so
        a first step is never skipped on the device.
        """
        state = self.optimizer.state
        params = list(chain.from_iterable(g["params"] for g in self.optimizer.param_groups if not self._stateless(g)))
        # Looked up per parameter (found in review: a count of the entries
        # of `state` was fooled by entries of parameters no longer in any
        # group, and fused SGD's skipped first step left garbage momentum).
        # A lookup hashes a tensor in Python (39-50 us per step for 161
        # parameters), so a positive answer is kept while the parameters and
        # the keys of `state` are the same objects in the same order and
        # every entry is filled: then it holds of any dict. Found in review:
        # a state reset in place (`state[p].clear()`, `state[p] = {}`, a
        # momentum buffer set to None) kept the answer, and fused SGD's
        # skipped step left garbage momentum; so did a key swapped in place
        # (`state[q] = state.pop(p)`) under the entry count compared before.
        # Parameters and keys are compared by identity in C++: 10.5 us per
        # step for 161 parameters, 0.47 ms for 10,000 (their ids in Python
        # took 31 us and 1.7 ms). The objects are kept with the answer, so
        # that no id is reused meanwhile; the state dict by its id only
        # (found in review: holding it kept the old optimizer state alive
        # after load_state_dict, 8 bytes per fp32 parameter of AdamW on the
        # GPU), and the answer is dropped where the wrapper replaces it.
        # (The momentum check costs 12 us per 161 entries: SGD's only.)
        filled = _filled if isinstance(self.optimizer, torch.optim.SGD) else bool
        kept = self.__dict__.get("_state_verdict")
        if (kept is not None and kept[0] == id(state) and _ops.same_objects(params, kept[1])
                and _ops.same_objects(state, kept[2])
                and all(map(filled, state.values()) if filled is _filled else state.values())):
            return True
        # The kept answer is a host cache: not written while dynamo traces
        # (torch 2.11's stops on the assignment after this function's isinstance
        # of the inner optimizer: no AttributeMutation; seen running its suite).
        tracing = torch.compiler.is_compiling()
        if all(map(filled, map(state.get, params))):
            if not tracing:
                self._state_verdict = (id(state), tuple(params), tuple(state))
            return True
        if not tracing:
            self.__dict__.pop("_state_verdict", None)
        return all(p.grad is None or filled(state.get(p)) for p in params)

    def _fused_step(self, total: Tensor, found: Tensor, policy: str, saved: dict, on_device: bool) -> None:
        """Hand the divisor ``total`` (and, on the device, the flag) to the fused inner step."""
        inner = self.optimizer
        host = _host_decides(total)
        if host and on_device and found.item() == 0.0:
            # A finite step needs no flag. A non-finite one still reaches the
            # inner step through found_inf, so its hooks run as on a GPU.
            on_device = False
        elif host and not on_device and policy == "skip" and found.item() != 0.0 and self._has_state():
            # The check step() left to the host: the same skip through
            # found_inf, counted here as clip_scalars_ counts it on a device.
            self.skipped_steps.add_(1)
            on_device = True
        if not on_device and not self._check_finite(found, policy):
            return
        try:
            if host and total.item() == 1.0:
                inner.__dict__.pop("grad_scale", None)  # a user's divisor of 1 included
            else:
                inner.grad_scale = total
            if on_device:
                inner.found_inf = found  # counted in skipped_steps by clip_scalars_
            elif policy != "skip" and "found_inf" in saved:
                inner.found_inf = saved["found_inf"]  # the user's flag, the inner step's to apply
            else:
                inner.__dict__.pop("found_inf", None)
            inner.step()
        finally:
            for name in _SCALE_ATTRS:
                inner.__dict__.pop(name, None)
            inner.__dict__.update(saved)

    def _plain_step(
        self, held, grads: Optional[list[Tensor]], one_call: bool, factor: Tensor, found: Tensor, policy: str,
    ) -> None:
        """Scale the gradients (``held`` on the fast path, else ``grads``) by ``factor``, then step."""
        if not self._check_finite(found, policy):
            return
        with torch.no_grad():
            if held is not None:
                _clip._scale_held(held, factor)
            else:
                _clip._scale(grads, factor, one_call)
        self.optimizer.step()
