"""The ops in plain PyTorch, for what the kernels do not cover.

Used when the extension cannot be loaded, for devices it has no kernel for,
and for sparse or complex gradients. Same contract as ``torch.ops.fastclip``
(float32 norms accumulated in float64, coefficient from the float64 norm),
one tensor at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _dense_values(t: Tensor) -> Tensor:
    """The stored values whose norm is the tensor's norm."""
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()  # duplicates add up before the norm
    if t.layout != torch.strided:
        return t.values()  # compressed layouts store no duplicates
    return t


def _norm64(t: Tensor, ord: float) -> Tensor:
    values = _dense_values(t)
    if values.is_complex():
        values = values.abs()
    return torch.linalg.vector_norm(values, ord, dtype=torch.float64)


def multi_tensor_norm(tensors: list[Tensor], ord: float, per_tensor: bool) -> tuple[Tensor, Tensor]:
    device = tensors[0].device
    each = torch.stack([_norm64(t, ord) for t in tensors])
    total = torch.linalg.vector_norm(each, ord).to(torch.float32)
    if per_tensor:
        return total, each.to(torch.float32)
    return total, torch.empty((0,), dtype=torch.float32, device=device)


def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor) -> None:
    for t in tensors:
        t.mul_(coef.to(t.device))


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
