"""fastclip: fused multi-tensor gradient norms and clipping for PyTorch.

Drop-in for ``torch.nn.utils``::

    import fastclip
    total_norm = fastclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
"""
from __future__ import annotations

import torch  # noqa: F401  (torch must be loaded before the extension)

from ._version import MIN_TORCH as _MIN_TORCH
from ._version import torch_release as _torch_release

if _torch_release(torch.__version__) < _MIN_TORCH:
    raise ImportError(
        f"fastclip needs torch >= {'.'.join(map(str, _MIN_TORCH))}, found torch {torch.__version__}; "
        "upgrade torch, then rebuild fastclip against it (pip install --no-build-isolation .)"
    )

from . import _ops  # noqa: E402
from ._version import __version__  # noqa: E402
from .clip import clip_grad_norm, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm, grad_norms  # noqa: E402
from .optim import ClippedOptimizer  # noqa: E402


def backend() -> str:
    """What computes the results: ``"extension (cpu)"``, ``"extension (cpu, cuda)"``,
    or ``"fallback (<why>)"`` when the compiled extension is not loaded."""
    if not _ops.available():
        return f"fallback (fastclip._C could not be loaded: {_ops.import_error()})"
    devices = [d for d in ("cpu", "cuda") if _ops.has_kernel(d)]
    return f"extension ({', '.join(devices)})"


def build_info() -> dict:
    """How the extension was built: version and whether CUDA kernels are in it;
    and how its CPU kernels prefetch (``cpu_prefetch``: ``"all"`` or ``"heads"``,
    ``cpu_prefetch_head_bytes``, ``cpu_prefetch_decided_by``)."""
    return _ops.build_info()


__all__ = [
    "ClippedOptimizer",
    "__version__",
    "backend",
    "build_info",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_norms",
]
