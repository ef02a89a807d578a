"""Runs the CPU ops on tensors placed against pages the process may not
touch, in a process of its own (tests/test_memory_bounds.py): a read or
write past a tensor's ends, or a write where the contract allows none,
ends it with SIGSEGV, which no value check can see (a vector load past the
end that masks the extra lanes, a scale by 1 that stores what it read).

    python tests/guarded_memory.py bounds|readonly

Prints "ok" and exits 0 when every call stayed in bounds and gave the
float64 reference's result.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import sys
import warnings

import torch

import fastclip

PAGE = mmap.PAGESIZE
PROT_NONE, PROT_READ = 0, mmap.PROT_READ
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ORDERS = (2.0, 1.0, math.inf, 3.5, 0.5)
# Element counts around the kernels' vector widths (8 and 16 lanes, pairs of
# 16-bit values) and past one 64 Ki-element chunk.
LENGTHS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 41, 127, 129, (1 << 16) + 5)
NORM_RTOL = 1e-6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
ops = torch.ops.fastclip


class Region:
    """Anonymous pages: one guard page, ``pages`` usable pages, one guard page."""

    def __init__(self, pages: int):
        self.pages = pages
        self.buf = mmap.mmap(-1, (pages + 2) * PAGE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self._protect(0, 1, PROT_NONE)
        self._protect(pages + 1, 1, PROT_NONE)

    def _protect(self, first: int, count: int, prot: int) -> None:
        if _libc.mprotect(self.base + first * PAGE, count * PAGE, prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")

    def read_only(self) -> None:
        self._protect(1, self.pages, PROT_READ)

    def tensor(self, dtype: torch.dtype, n: int, at_end: bool) -> torch.Tensor:
        """``n`` elements ending at the trailing guard page, or starting right after the leading one."""
        size = torch.empty((), dtype=dtype).element_size()
        offset = PAGE + (self.pages * PAGE - n * size if at_end else 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer of a read-only buffer warns
            return torch.frombuffer(self.buf, dtype=dtype, offset=offset, count=n)


def pages_for(n: int, dtype: torch.dtype) -> int:
    return -(-n * torch.empty((), dtype=dtype).element_size() // PAGE)


def values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ref_norm(ts, ord: float) -> float:
    flat = torch.cat([t.double().flatten() for t in ts])
    return torch.linalg.vector_norm(flat, ord).item()


def check_norm(got, want: float, what: str) -> None:
    got = float(got)
    if not abs(got - want) <= NORM_RTOL * abs(want):
        raise AssertionError(f"{what}: norm {got!r}, float64 reference {want!r}")


def check_equal(t: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not torch.equal(t, want):
        raise AssertionError(f"{what}: elements differ from the reference")


def bounds() -> None:
    """Every op on a tensor against each guard page, alone and in a list with another."""
    for dtype in DTYPES:
        for n in LENGTHS:
            region = Region(pages_for(n, dtype) + 1)
            neighbour = values(37, dtype, seed=1)
            for at_end in (True, False):
                what = f"{dtype} n={n} {'ending at' if at_end else 'starting after'} a guard page"
                t = region.tensor(dtype, n, at_end)
                t.copy_(values(n, dtype, seed=n))
                for lst in ([t], [neighbour, t]):
                    for ord in ORDERS:
                        total, each = ops.multi_tensor_norm(lst, ord, True)
                        check_norm(total, ref_norm(lst, ord), f"{what}, order {ord}")
                        check_norm(each[-1], ref_norm([t], ord), f"{what}, order {ord}, per tensor")
                        total64, _ = ops.multi_tensor_norm(lst, ord, False, True)  # float64 outputs
                        check_norm(total64, ref_norm(lst, ord), f"{what}, order {ord}, fp64 outputs")
                original = t.clone()
                ops.multi_tensor_scale_([neighbour, t], torch.tensor(0.5))
                check_equal(t, (original.double() * 0.5).to(dtype), f"{what}, scale")
                t.copy_(original)
                ops.multi_tensor_clamp_([t, neighbour], 0.25)
                check_equal(t, original.clamp(-0.25, 0.25), f"{what}, clamp")
                t.copy_(original)
                want = ref_norm([t], 2.0)
                check_norm(ops.clip_([t], want / 4, 2.0), want, f"{what}, clip_")
                p = torch.nn.Parameter(torch.empty(n, dtype=dtype))
                p.grad = t
                t.copy_(original)
                check_norm(fastclip.clip_grad_norm_([p], want / 4), want, f"{what}, clip_grad_norm_")
                fastclip.clip_grad_value_([p], 0.125)


def readonly() -> None:
    """Gradients in read-only pages: a clip that needs no scaling, and a
    scale by exactly 1, must not store anything (the contract: no memory
    traffic at all), in every dtype and in one mixed list."""
    made = []
    for dtype in DTYPES:
        for n in (3, 17, 3 * (1 << 16) + 7):
            region = Region(pages_for(n, dtype))
            t = region.tensor(dtype, n, at_end=True)
            t.copy_(values(n, dtype, seed=n))
            region.read_only()
            made.append((region, t))
    tensors = [t for _, t in made]
    for lst in [[t] for t in tensors] + [tensors]:
        for coef in (torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)):
            ops.multi_tensor_scale_(lst, coef)
        for ord in ORDERS:
            want = ref_norm(lst, ord)
            check_norm(ops.clip_(lst, 2 * want + 1, ord), want, f"clip_ below max_norm, order {ord}")
        params = []
        for t in lst:
            p = torch.nn.Parameter(torch.empty(t.shape, dtype=t.dtype))
            p.grad = t
            params.append(p)
        want = ref_norm(lst, 2.0)
        check_norm(fastclip.clip_grad_norm_(params, 2 * want + 1), want, "clip_grad_norm_ below max_norm")
        fastclip.clip_grads_with_norm_(params, 1.0, torch.tensor(0.5))  # coefficient min(1, 2) = 1


if __name__ == "__main__":
    {"bounds": bounds, "readonly": readonly}[sys.argv[1]]()
    print("ok")
