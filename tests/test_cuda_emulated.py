"""fastclip's CUDA kernels, run on the CPU under an emulator of the CUDA
execution model (tests/cuda_emu/emu.h), against the float64 reference and
torch's CPU arithmetic.

The kernel source (csrc/cuda/multi_tensor_kernels.cu) is compiled unmodified
by the host compiler, with its ``<<<...>>>`` launches rewritten into calls of
the emulator. Every CUDA thread is a fiber and every block an OS thread
(blocks run concurrently, in a random order, threads in a random order
between collectives); warp shuffles, ballots and __syncthreads are strict
collectives that fail the launch when a thread of the warp or block misses
them. This tests the kernels' logic (chunk lookup, head/vector/tail split,
scaled accumulation, the reduction trees, the ticket protocol between
blocks, the early exit on a coefficient of 1) without a GPU. It does not
test what only hardware shows: the GPU's weaker memory model, device libm,
speed. tests/test_cuda.py covers those on a GPU.

Needs g++ on x86-64 and the CUDA toolkit's headers (cuda_runtime.h,
cuda_fp16.h, cuda_bf16.h); skipped without them, unless
FASTCLIP_CUDA_EMULATOR_REQUIRED=1 (CI sets it where nvcc is installed), which
turns the skip into a failure. FASTCLIP_CUDA_EMULATOR_SOURCE points the build
at another kernel source (negative controls: a kernel with a bug planted).
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence

import pytest
import torch
from torch import Tensor

from testing import (
    DTYPES,
    ORDS,
    assert_identical,
    assert_norm_close,
    assert_same_bits,
    available_memory_bytes,
    clip_scalars_cases,
    dtype_id,
    ord_id,
    ref_coef,
    ref_norm,
    ref_norms_each,
    run_clip_scalars,
)

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emu"
KERNEL_SOURCE = ROOT / "csrc" / "cuda" / "multi_tensor_kernels.cu"

# fastclip::DType values (csrc/fastclip.h).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
MAX_VIEW_DIMS = 8  # kMaxViewDims (multi_tensor_kernels.h)
MAX_VIEWS = 16  # kMaxViewsPerLaunch
CHUNK = 1 << 16  # kChunkElems
H200_SMS = 132
ERROR_BYTES = 4096

# A signaling NaN of each dtype: any arithmetic on it (x * 1 included) gives
# a quiet NaN, so a value still signaling after a call was never written.
SIGNALING_NAN_BITS = {
    torch.float32: (0x7F800001, torch.int32),
    torch.float64: (0x7FF0000000000001, torch.int64),
    torch.float16: (0x7C01, torch.int16),
    torch.bfloat16: (0x7F81, torch.int16),
}


class _Desc(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("numel", ctypes.c_int64), ("dtype", ctypes.c_int32)]


class _View(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("dims", ctypes.c_int32),
        ("sizes", ctypes.c_int64 * MAX_VIEW_DIMS),
        ("strides", ctypes.c_int64 * MAX_VIEW_DIMS),
    ]


def _cuda_include() -> Optional[Path]:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c) / "include"
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1] + " "
    except OSError:
        pass
    return ""


def _translation_unit(source: Path) -> str:
    """The kernel source with its launches rewritten for the emulator, and a
    call after each __shared__ declaration that poisons the variable once
    per block (on the same line: compiler messages keep the source's lines)."""
    text = source.read_text()
    launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.*?)>>>\((.*?)\);")
    rewritten, count = launch.subn(r"::emu::Launch(\2).run(\1, \3);", text)
    if count == 0 or count != text.count("<<<"):
        raise RuntimeError(f"{source}: rewrote {count} of {text.count('<<<')} kernel launches")
    shared = re.compile(r"^(\s*__shared__\s+[\w:<>]+\s+(\w+)\s*(?:\[[^\]]*\])?\s*;)", re.MULTILINE)
    rewritten, declared = shared.subn(r"\1 ::emu::poison_shared(&\2, sizeof(\2));", rewritten)
    if declared != text.count("__shared__"):
        raise RuntimeError(f"{source}: found {declared} of {text.count('__shared__')} __shared__ declarations")
    return f'#include "emu.h"\n#line 1 "{source}"\n{rewritten}\n#include "driver.cpp"\n'


def _build(out_dir: Path) -> ctypes.CDLL:
    if platform.machine() not in ("x86_64", "AMD64"):
        raise _Unavailable(f"the emulator's fiber switch is x86-64 only (this is {platform.machine()})")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise _Unavailable("no C++ compiler (g++)")
    include = _cuda_include()
    if include is None:
        raise _Unavailable("no CUDA toolkit headers (cuda_runtime.h)")
    source = Path(os.environ.get("FASTCLIP_CUDA_EMULATOR_SOURCE", KERNEL_SOURCE))
    tu = out_dir / "kernels_emulated.cpp"
    tu.write_text(_translation_unit(source))
    lib = out_dir / "libfastclip_cuda_emulated.so"
    # UBSan's alignment check, trapping (SIGILL, no runtime library): a GPU
    # faults on a misaligned 16-byte access, x86 does not. No shadow-stack marking (the fibers swap stacks); stack
    # probes so a large frame cannot jump a fiber's guard page. FMA where
    # the CPU has it, as the GPU has (nvcc contracts a * b + c).
    fma = ["-mfma", "-ffp-contract=fast"] if " fma " in _cpu_flags() else ["-mno-fma"]
    cmd = [compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
           "-fsanitize=alignment", "-fsanitize-undefined-trap-on-error", "-fcf-protection=none",
           "-fstack-clash-protection", *fma,
           "-I", str(EMU_DIR), "-I", str(source.parent), "-I", str(KERNEL_SOURCE.parent), "-I", str(ROOT / "csrc"),
           "-isystem", str(include),
           "-o", str(lib), str(tu), "-lpthread"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{done.stderr[-6000:]}")
    return ctypes.CDLL(str(lib))


class _Unavailable(Exception):
    pass


BASE_SEED = int(os.environ.get("FASTCLIP_CUDA_EMULATOR_SEED", "1"))


class Emulated:
    """The launchers of multi_tensor_kernels.h on CPU tensors, through the
    emulator (tests/cuda_emu/driver.cpp mirrors the torch glue's use of them)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        c = ctypes
        buf, i64, u64p = c.c_char_p, c.c_int64, c.POINTER(c.c_uint64)
        lib.emu_configure.argtypes = [c.c_int, c.c_uint64]
        lib.emu_norm.argtypes = [c.c_void_p, i64, c.c_double, c.c_int, c.c_int, c.c_void_p, c.c_void_p, u64p,
                                 c.POINTER(i64), buf, i64]
        lib.emu_clip.argtypes = [c.c_void_p, i64, c.c_void_p, i64, c.c_void_p, c.c_int32, c.c_double, c.c_double,
                                 c.c_int, c.c_void_p, c.POINTER(c.c_double), c.POINTER(c.c_int32), u64p, buf, i64]
        lib.emu_scale.argtypes = [c.c_void_p, i64, c.c_void_p, c.c_int32, c.c_double, c.c_int, buf, i64]
        lib.emu_clamp.argtypes = [c.c_void_p, i64, c.c_double, c.c_int, buf, i64]
        lib.emu_scale_strided.argtypes = [c.c_void_p, c.c_int32, c.c_void_p, c.c_int32, c.c_double, c.c_int, buf,
                                          i64]
        lib.emu_clip_scalars.argtypes = [c.c_void_p, c.c_void_p, c.c_double, c.c_int, c.c_int, c.c_void_p,
                                         c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, buf, i64]
        lib.emu_selftest.argtypes = [c.c_int, c.c_void_p, buf, i64]
        self.configure()

    def configure(self, workers: int = 4, seed: int = 0) -> None:
        """OS threads running blocks at once, and the seed of the block and
        thread orders (offset by FASTCLIP_CUDA_EMULATOR_SEED)."""
        self.lib.emu_configure(workers, BASE_SEED + seed)

    @staticmethod
    def _descs(tensors: Sequence[Tensor]):
        for t in tensors:
            assert t.device.type == "cpu" and t.is_contiguous(), "the driver takes dense CPU tensors"
        return (_Desc * max(len(tensors), 1))(
            *[_Desc(t.data_ptr(), t.numel(), DTYPE_CODES[t.dtype]) for t in tensors])

    @staticmethod
    def _views(views: Sequence[Tensor]):
        assert len(views) <= MAX_VIEWS
        structs = []
        for v in views:
            assert v.dim() <= MAX_VIEW_DIMS
            sizes = list(v.shape) + [1] * (MAX_VIEW_DIMS - v.dim())
            strides = list(v.stride()) + [1] * (MAX_VIEW_DIMS - v.dim())
            structs.append(_View(v.data_ptr(), v.numel(), DTYPE_CODES[v.dtype], v.dim(),
                                 (ctypes.c_int64 * MAX_VIEW_DIMS)(*sizes), (ctypes.c_int64 * MAX_VIEW_DIMS)(*strides)))
        return (_View * max(len(structs), 1))(*structs)

    @staticmethod
    def _run(fn, *args) -> None:
        error = ctypes.create_string_buffer(ERROR_BYTES)
        if fn(*args, error, ERROR_BYTES) != 0:
            raise RuntimeError(error.value.decode())

    def norm(self, tensors: Sequence[Tensor], ord: float = 2.0, num_sms: int = 2, per_tensor: bool = True,
             fp64: bool = False) -> dict:
        """fastclip::multi_tensor_norm (outputs poisoned with NaN first)."""
        c = ctypes
        dtype = torch.float64 if fp64 else torch.float32
        total = torch.full((), float("nan"), dtype=dtype)
        each = torch.full((len(tensors),), float("nan"), dtype=dtype)
        left, chunks = c.c_uint64(), c.c_int64()
        self._run(self.lib.emu_norm, self._descs(tensors), len(tensors), ord, num_sms, int(fp64), total.data_ptr(),
                  each.data_ptr() if per_tensor else None, c.byref(left), c.byref(chunks))
        return {"total": total, "each": each if per_tensor else None, "tickets_left": left.value,
                "chunks": chunks.value}

    def clip(self, tensors: Sequence[Tensor], max_norm: float, ord: float = 2.0, num_sms: int = 2) -> dict:
        """fastclip::clip_: dense tensors in place; views with gaps (not
        contiguous here) read through contiguous copies and scaled through
        their strides, as the glue does."""
        c = ctypes
        read = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        write = [t for t in tensors if t.is_contiguous()]
        views = [t for t in tensors if not t.is_contiguous()]
        total = torch.full((), float("nan"))
        coef, nonfinite, left = c.c_double(), c.c_int32(-1), c.c_uint64()
        self._run(self.lib.emu_clip, self._descs(read), len(read), self._descs(write), len(write), self._views(views),
                  len(views), max_norm, ord, num_sms, total.data_ptr(), c.byref(coef), c.byref(nonfinite),
                  c.byref(left))
        return {"total": total, "coef": coef.value, "nonfinite": nonfinite.value, "tickets_left": left.value}

    @staticmethod
    def _coef_args(coef):
        if isinstance(coef, Tensor):
            return coef.data_ptr(), DTYPE_CODES[coef.dtype], 0.0
        return None, DTYPE_CODES[torch.float64], float(coef)

    def scale(self, tensors: Sequence[Tensor], coef, num_sms: int = 2) -> None:
        """coef: a host float, or a 0-dim CPU tensor read as the device coefficient."""
        self._run(self.lib.emu_scale, self._descs(tensors), len(tensors), *self._coef_args(coef), num_sms)

    def clamp(self, tensors: Sequence[Tensor], bound: float, num_sms: int = 2) -> None:
        self._run(self.lib.emu_clamp, self._descs(tensors), len(tensors), bound, num_sms)

    def scale_strided(self, views: Sequence[Tensor], coef, num_sms: int = 2) -> None:
        self._run(self.lib.emu_scale_strided, self._views(views), len(views), *self._coef_args(coef), num_sms)

    def clip_scalars_(self, norm: Tensor, max_norm: float, loss_scale: Optional[Tensor],
                      extra_scale: Optional[Tensor], found_inf: Optional[Tensor], extra_found: Optional[Tensor],
                      skip_inf_divisor: bool, last_norm: Tensor, last_coef: Tensor, skipped: Tensor,
                      count_skip: bool):
        """fastclip::clip_scalars_ with the op's signature: CPU tensors read
        and written by the kernel as device memory; outputs poisoned first."""
        inputs = (norm, loss_scale, extra_scale, found_inf, extra_found)
        pointers = (ctypes.c_void_p * 5)(*[None if t is None else t.data_ptr() for t in inputs])
        dtypes = (ctypes.c_int32 * 5)(*[DTYPE_CODES[torch.float64 if t is None else t.dtype] for t in inputs])
        factor = torch.full((), float("nan"), dtype=torch.float64)
        divisor = torch.full((), float("nan"))
        found = torch.full((), float("nan"))
        self._run(self.lib.emu_clip_scalars, pointers, dtypes, max_norm, int(skip_inf_divisor), int(count_skip),
                  last_norm.data_ptr(), last_coef.data_ptr(), skipped.data_ptr(), factor.data_ptr(),
                  divisor.data_ptr(), found.data_ptr())
        return factor, divisor, found

    def selftest(self, mode: int) -> List[int]:
        out = torch.full((128,), -1, dtype=torch.int32)
        self._run(self.lib.emu_selftest, mode, out.data_ptr())
        return out.tolist()


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> Emulated:
    try:
        lib = _build(tmp_path_factory.mktemp("cuda_emu"))
    except _Unavailable as why:
        if os.environ.get("FASTCLIP_CUDA_EMULATOR_REQUIRED") == "1":
            pytest.fail(f"CUDA emulator required but unavailable: {why}")
        pytest.skip(f"CUDA emulator unavailable: {why}")
    e = Emulated(lib)
    yield e
    e.configure()


# ---------------------------------------------------------------- helpers
def _values(n: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> Tensor:
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _misaligned(n: int, dtype: torch.dtype, offset: int, gen: torch.Generator) -> Tensor:
    """A contiguous view that starts `offset` elements into its buffer (not
    16-byte aligned for offset > 0): the kernels' scalar head path."""
    return _values(n + offset, dtype, gen)[offset:]


def _odd_list(dtype: torch.dtype, gen: torch.Generator) -> List[Tensor]:
    """Empty, single, odd sizes, chunk boundaries (65536 = one chunk exactly),
    several chunks, and views at every element offset up to a vector."""
    per_vec = 16 // torch.tensor([], dtype=dtype).element_size()
    tensors = [_values(n, dtype, gen) for n in (0, 1, 3, 5 * 123 * 123, CHUNK, CHUNK + 1, 3 * CHUNK + 17)]
    tensors += [_misaligned(n, dtype, off, gen) for off in range(1, per_vec) for n in (1, per_vec - 1, 1000 + off)]
    tensors.append(_values(0, dtype, gen))
    return tensors


class Prefixes:
    """The elements before each view of `tensors` in its base tensor
    (misaligned views: the bytes a head that starts too early would hit)."""

    def __init__(self, tensors: Sequence[Tensor]):
        self.saved = []
        for t in tensors:
            base = t._base
            if base is not None and t.numel() > 0:
                offset = (t.data_ptr() - base.data_ptr()) // t.element_size()
                self.saved.append((base, offset, base.flatten()[:offset].clone()))

    def assert_untouched(self) -> None:
        for base, offset, before in self.saved:
            assert_same_bits(base.flatten()[:offset], before)


class GuardedMemory:
    """Tensors between inaccessible pages, with the spare bytes between a
    tensor and its pages filled with a sentinel: a kernel that reaches a
    page crashes the test process (SIGSEGV, with faulthandler's traceback),
    and one that reads or writes a spare byte changes a norm or the sentinel
    (0x7B bytes: large finite values in every dtype, so a read changes any
    norm and a write by any coefficient other than 1 changes the bytes)."""

    PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
    MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20
    SENTINEL = 0x7B

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
        self.libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.mappings = []
        self.spares = []  # (address, bytes) of sentinel-filled spare bytes

    def _protect(self, address: int, size: int, prot: int) -> None:
        if self.libc.mprotect(address, size, prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")

    def place(self, values: Tensor, lead: Optional[int] = None, readonly: bool = False) -> Tensor:
        """A copy of `values` starting `lead` bytes after a guard page (None:
        ending right at the next guard page); `readonly` makes its pages
        read-only, so that any write crashes."""
        nbytes = values.numel() * values.element_size()
        if nbytes == 0:
            return values.clone()
        span = (nbytes + (lead or 0) + self.page - 1) // self.page * self.page
        lead_bytes = span - nbytes if lead is None else lead
        base = self.libc.mmap(None, span + 2 * self.page, self.PROT_RW, self.MAP_PRIVATE_ANONYMOUS, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.mappings.append((base, span + 2 * self.page))
        data = base + self.page
        ctypes.memset(data, self.SENTINEL, span)
        start = data + lead_bytes
        self.spares += [(data, lead_bytes), (start + nbytes, span - lead_bytes - nbytes)]
        out = torch.frombuffer((ctypes.c_char * nbytes).from_address(start), dtype=values.dtype)
        out.copy_(values.flatten())
        self._protect(base, self.page, self.PROT_NONE)
        self._protect(data + span, self.page, self.PROT_NONE)
        if readonly:
            self._protect(data, span, self.PROT_READ)
        return out

    def assert_spares_untouched(self) -> None:
        for address, size in self.spares:
            assert ctypes.string_at(address, size) == bytes([self.SENTINEL]) * size, "a spare byte was written"

    def release(self) -> None:
        for base, total in self.mappings:
            self.libc.munmap(base, total)
        self.mappings.clear()
        self.spares.clear()


@pytest.fixture
def guarded():
    memory = GuardedMemory()
    yield memory
    memory.release()


def _opmath_scaled(t: Tensor, coef: float) -> Tensor:
    """x * coef as torch computes it on the CPU: in float64 for fp64, else in
    float32 with the coefficient rounded to float32 (the kernels' contract),
    or, for a coefficient below float32's normal range, in float64 rounded
    to float32."""
    if t.dtype == torch.float64:
        return t * coef
    if 0.0 < abs(coef) < 2.0**-126:
        return (t.double() * coef).float().to(t.dtype)
    return (t.float() * torch.tensor(coef, dtype=torch.float64).float()).to(t.dtype)


def _check_clip(emu: Emulated, tensors: Sequence[Tensor], max_norm: float, ord: float = 2.0,
                num_sms: int = 2) -> dict:
    """Clips `tensors` and checks what can be checked without a reference
    norm: every element is torch's CPU product by the coefficient the
    kernels computed, the bytes before views untouched, the tickets zero,
    the flag right; returns the clip's outputs."""
    before = [t.clone() for t in tensors]
    prefixes = Prefixes(tensors)
    r = emu.clip(tensors, max_norm, ord, num_sms=num_sms)
    for b, t in zip(before, tensors):
        assert_identical(t, _opmath_scaled(b, r["coef"]) if r["coef"] != 1.0 else b)
    prefixes.assert_untouched()
    assert r["tickets_left"] == 0
    assert r["nonfinite"] == int(not math.isfinite(ref_norm(before, ord).item()))
    return r


# ----------------------------------------------------------------- tests
def test_emulator_reports_divergent_collectives(emu):
    """The emulator itself: a shuffle reached by half a warp, or a
    __syncthreads one thread skips, fails the launch; uniform code runs, and
    the shuffle moves lane i+1's value to lane i (lane 31 keeps its own)."""
    with pytest.raises(RuntimeError, match="__shfl_down_sync"):
        emu.selftest(0)
    with pytest.raises(RuntimeError, match="__syncthreads"):
        emu.selftest(1)
    out = emu.selftest(2)
    for block in range(2):
        for t in range(64):
            lane = t % 32
            assert out[block * 64 + t] == (2 * t + 1 if lane < 31 else 2 * t), (block, t)


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_odd_list_norm_and_clip(emu, dtype, ord):
    """Norm (with and without per-tensor norms: the glue passes null) and
    clip of the odd list: the float64 reference, the coefficient to 1e-12
    (a dropped element shows there), every element of the clip."""
    gen = torch.Generator().manual_seed(3)
    tensors = _odd_list(dtype, gen)
    r = emu.norm(tensors, ord)
    expected = ref_norm(tensors, ord)
    assert_norm_close(r["total"], expected, dtype)
    assert_norm_close(r["each"], ref_norms_each(tensors, ord), dtype)
    assert r["tickets_left"] == 0
    assert r["chunks"] == sum((t.numel() + CHUNK - 1) // CHUNK for t in tensors)
    assert_same_bits(emu.norm(tensors, ord, per_tensor=False)["total"], r["total"])
    # float64 outputs: the same norms before their rounding to float32.
    wide = emu.norm(tensors, ord, fp64=True)
    assert wide["total"].dtype == wide["each"].dtype == torch.float64
    assert_same_bits(wide["total"].float(), r["total"])
    assert_same_bits(wide["each"].float(), r["each"])
    torch.testing.assert_close(wide["total"], expected.double(), rtol=1e-9, atol=0.0)
    c = _check_clip(emu, tensors, max_norm=0.5, ord=ord)
    assert_same_bits(c["total"], r["total"])
    assert c["coef"] == pytest.approx(ref_coef(0.5, expected).item(), rel=1e-12)
    assert c["coef"] < 1.0


@pytest.mark.parametrize("ord", [0.01, 0.5, 1.5, 1500.0, 1e300], ids=ord_id)
def test_general_orders_whose_powers_leave_the_double_range(emu, ord):
    """A general p accumulates (|x| / max |x|)^p: orders whose powers of
    ordinary values underflow or overflow a double still give the norm."""
    gen = torch.Generator().manual_seed(12)
    tensors = [_values(CHUNK + 300, torch.float32, gen), _values(777, torch.float64, gen, 1e200),
               _values(5000, torch.bfloat16, gen, 1e-20), _values(3, torch.float16, gen)]
    # The last group is the one whose norm of order 0.01 is finite (2^100 * ...).
    for group in (tensors, tensors[:1], tensors[2:], [tensors[3][:2]]):
        r = emu.norm(group, ord)
        expected = ref_norm(group, ord)
        if expected.item() < torch.finfo(torch.float32).max:
            assert_norm_close(r["total"], expected.float())
        else:
            assert r["total"].item() == math.inf
        wide = emu.norm(group, ord, fp64=True)  # no float32 rounding: finite beyond its range
        torch.testing.assert_close(wide["total"], expected, rtol=1e-9, atol=0.0)
        torch.testing.assert_close(wide["each"], ref_norms_each(group, ord), rtol=1e-9, atol=0.0)
        each = ref_norms_each(group, ord)
        finite = each < torch.finfo(torch.float32).max
        assert_norm_close(r["each"][finite], each[finite].float())
        # p = 0.01: (sum of ~70,000 terms near 1)^100 is beyond the double range.
        c = _check_clip(emu, [t.clone() for t in group], max_norm=1e-3, ord=ord)
        assert c["coef"] == pytest.approx(ref_coef(1e-3, expected).item(), rel=1e-9)


def test_tiny_values_that_decide_the_norm(emu):
    """Where tiny values matter: fp64 subnormals under p = 0.01 (each term
    (5e-324)^0.01 ~ 6e-4), and terms whose ratio to the largest value
    underflows a double ((1e-300 / 1e30)^0.01 ~ 5e-4, through logarithms),
    in one tensor and across tensors (sums of different scales combined)."""
    gen = torch.Generator().manual_seed(14)
    subnormals = (torch.rand(2000, generator=gen, dtype=torch.float64) * 1e-310).clamp_min(5e-324)
    cases = [
        [subnormals],
        [torch.cat([torch.tensor([1e30], dtype=torch.float64), torch.full((20,), 1e-300, dtype=torch.float64)])],
        [torch.tensor([1e30], dtype=torch.float64), torch.full((20,), 1e-300, dtype=torch.float64)],
        [torch.tensor([1e30], dtype=torch.float32), torch.full((20,), 1e-300, dtype=torch.float64)],
    ]
    for tensors in cases:
        r = emu.norm(tensors, 0.01)
        expected = ref_norm(tensors, 0.01)
        # Without the tiny terms the norm would be 1e30, or 0 for the subnormals.
        assert expected.item() > 2e30 or len(tensors[0]) == 2000
        assert_norm_close(r["total"], expected)
        each = ref_norms_each(tensors, 0.01)
        assert_norm_close(r["each"], each.float())


@pytest.mark.large
def test_tensor_beyond_2_pow_31_elements(emu):
    """64-bit element offsets: a bf16 tensor of 2^31 + 5 elements (4 GiB,
    32,769 chunks), its only nonzero values at the very end and at 2^31 - 1.
    About 30 s."""
    n = 2**31 + 5
    if available_memory_bytes() < 3 * n:
        pytest.skip("needs about 6 GiB of free memory")
    x = torch.zeros(n, dtype=torch.bfloat16)
    x[2**31 - 1] = 1.0
    x[-3:] = torch.tensor([3.0, 4.0, 12.0])
    r = emu.norm([x], 2.0, num_sms=H200_SMS)
    assert r["total"].item() == pytest.approx(math.sqrt(170.0), rel=1e-7)
    assert r["chunks"] == (n + CHUNK - 1) // CHUNK and r["tickets_left"] == 0
    emu.scale([x], 0.5, num_sms=H200_SMS)
    assert x[-3:].tolist() == [1.5, 2.0, 6.0] and x[2**31 - 1].item() == 0.5
    assert x[: 2**31 - 1].count_nonzero().item() == 0


def test_tensor_of_300_chunks(emu):
    """More chunks in one tensor than threads in a block: the block that
    counts the last chunk folds the partials in several rounds per thread."""
    gen = torch.Generator().manual_seed(15)
    x = _values(300 * CHUNK - 7, torch.float32, gen)
    expected = ref_norm([x])
    for sms in (1, H200_SMS):
        r = emu.norm([x], 2.0, num_sms=sms)
        assert_norm_close(r["total"], expected)
        assert r["chunks"] == 300 and r["tickets_left"] == 0
    c = _check_clip(emu, [x], max_norm=1.0, num_sms=H200_SMS)
    assert c["coef"] == pytest.approx(ref_coef(1.0, expected).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_no_access_outside_the_tensors(emu, guarded, dtype):
    """Every size up to a few vectors and around chunk boundaries, ending at
    a guard page or starting 0 to 8 elements after one: norm, clip, scale and
    clamp touch no byte outside the tensors."""
    gen = torch.Generator().manual_seed(13)
    size = torch.tensor([], dtype=dtype).element_size()
    sizes = list(range(1, 41)) + [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 9]
    tensors = []
    for k, n in enumerate(sizes):
        tensors.append(guarded.place(_values(n, dtype, gen)))
        tensors.append(guarded.place(_values(n, dtype, gen), lead=(k % 9) * size))
    for ord in ORDS:
        r = emu.norm(tensors, ord)
        assert_norm_close(r["total"], ref_norm(tensors, ord))
        assert_norm_close(r["each"], ref_norms_each(tensors, ord))
    guarded.assert_spares_untouched()
    _check_clip(emu, tensors, max_norm=1.0)
    guarded.assert_spares_untouched()
    before = [t.clone() for t in tensors]
    emu.scale(tensors, torch.tensor(3.0))
    for b, t in zip(before, tensors):
        assert_same_bits(t, _opmath_scaled(b, 3.0))
    expected = [t.clamp(-0.01, 0.01) for t in tensors]
    emu.clamp(tensors, 0.01)
    for got, want in zip(tensors, expected):
        assert_identical(got, want)
    guarded.assert_spares_untouched()


def test_many_tensors_of_mixed_dtypes(emu):
    """1,000 tensors, four dtypes, some of several chunks: the 32-ary tensor
    search with ballots, per-tensor tickets and the grid's last block."""
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(0, 3000, (1000,), generator=gen).tolist()
    sizes[10], sizes[500], sizes[999] = 2 * CHUNK + 3, CHUNK, 3 * CHUNK
    tensors = [_values(n, DTYPES[i % 4], gen) for i, n in enumerate(sizes)]
    for ord in (2.0, math.inf):
        r = emu.norm(tensors, ord, num_sms=3)
        assert_norm_close(r["total"], ref_norm(tensors, ord))
        assert_norm_close(r["each"], ref_norms_each(tensors, ord))
        assert r["tickets_left"] == 0
    _check_clip(emu, tensors, max_norm=1.0, num_sms=H200_SMS)


def test_same_bits_whatever_the_grid_and_schedule(emu):
    """The contract of launch_norm: bitwise reproducible, independent of the
    grid size and of the order in which blocks and threads run (four grid
    sizes, four seeds of the block and thread orders)."""
    gen = torch.Generator().manual_seed(5)
    tensors = [_values(n, DTYPES[i % 4], gen, scale=10.0 ** (i % 7 - 3))
               for i, n in enumerate([5, 3 * CHUNK + 1, 70000, 1, 0, 4097, 2 * CHUNK])]
    tensors.append(_values(1000, torch.float64, gen, scale=1e300))  # scaled fp64 sums
    try:
        for ord in ORDS:
            runs = []
            # Grids of 4, 8, 20 and 528 blocks.
            for workers, seed, sms in ((1, 1, 1), (4, 2, 2), (3, 9, 5), (8, 5, H200_SMS)):
                emu.configure(workers, seed)
                r = emu.norm(tensors, ord, num_sms=sms)
                r["coef"] = emu.clip([t.clone() for t in tensors], 1.0, ord, num_sms=sms)["coef"]
                runs.append(r)
            for r in runs[1:]:
                assert_same_bits(r["total"], runs[0]["total"])
                assert_same_bits(r["each"], runs[0]["each"])
                assert r["coef"] == runs[0]["coef"]
    finally:
        emu.configure()


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
def test_values_at_the_ends_of_every_range(emu, ord):
    """fp32 1e30 (squares beyond float32), fp16 norms beyond 65504, fp64
    near the double maximum and among the subnormals (the scaled sums), and
    all of them in one list (sums of different scales combined)."""
    gen = torch.Generator().manual_seed(6)
    cases = [
        [_values(3000, torch.float32, gen, 1e30)],
        [torch.full((1000,), 60000.0, dtype=torch.float16)],
        [_values(5000, torch.float64, gen, 1e307), torch.tensor([1.7e308, -1.7e308], dtype=torch.float64)],
        [_values(CHUNK + 9, torch.float64, gen, 1e-310), torch.tensor([5e-324], dtype=torch.float64)],
        [_values(100, torch.float64, gen, 1e300), _values(100, torch.float32, gen, 1e-30),
         _values(100, torch.bfloat16, gen, 1e30), _values(100, torch.float64, gen, 1e-300)],
        # At and above 2**1023 (the largest scale is 2**1023): finite double
        # norms beyond float32, whose coefficient must still be right.
        [torch.tensor([1e308], dtype=torch.float64)],
        [_values(CHUNK + 5, torch.float64, gen, 1e303), torch.tensor([-9e307, 1e-308], dtype=torch.float64)],
    ]
    for tensors in cases:
        r = emu.norm(tensors, ord)
        expected = ref_norm(tensors, ord)
        if math.isfinite(expected.item()) and expected.item() < torch.finfo(torch.float32).max:
            # Norms below float32's range come back as float32 rounds them (to 0).
            assert_norm_close(r["total"], expected.float())
            assert_norm_close(r["each"], ref_norms_each(tensors, ord).float())
        else:  # beyond float32: inf as a float32
            assert r["total"].item() == math.inf
        c = _check_clip(emu, [t.clone() for t in tensors], max_norm=1.0, ord=ord)
        assert c["coef"] == pytest.approx(ref_coef(1.0, expected).item(), rel=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nonfinite_values_propagate_and_are_flagged(emu, dtype, bad):
    """NaN and inf give torch's norm, set the flag, and the clip scales by
    the coefficient they give (NaN, or 0 for an infinite norm) as torch's
    clip_grad_norm_ does."""
    gen = torch.Generator().manual_seed(7)
    for ord in ORDS:
        tensors = [_values(CHUNK + 100, dtype, gen), _values(33, dtype, gen)]
        tensors[0][CHUNK + 50] = bad
        r = emu.norm(tensors, ord)
        expected = torch.linalg.vector_norm(torch.cat([t.double() for t in tensors]), ord).float()
        assert_identical(r["total"], expected)
        assert_identical(r["each"][0], expected)
        c = _check_clip(emu, tensors, max_norm=1.0, ord=ord)
        assert c["nonfinite"] == 1
        assert math.isnan(c["coef"]) if math.isnan(expected.item()) else c["coef"] == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_no_write_when_the_coefficient_is_one(emu, guarded, dtype):
    """Tensors and a strided view's base in read-only memory (any write
    crashes): a clip whose norm is below max_norm, scale by 1 from the host
    or from a device coefficient of any dtype, and the strided kernel's
    early exit. The control writes to the same tensors once made writable."""
    gen = torch.Generator().manual_seed(16)
    values = [_values(n, dtype, gen) for n in (1, 7, CHUNK + 3, 100)]
    tensors = [guarded.place(v, readonly=True) for v in values[:3]]
    tensors.append(guarded.place(values[3], lead=torch.tensor([], dtype=dtype).element_size(), readonly=True))
    base = guarded.place(_values(4 * 6, dtype, gen), readonly=True).view(4, 6)
    view = base[:, ::2]
    c = emu.clip(tensors + [view], max_norm=1e6)
    assert c["coef"] == 1.0 and c["tickets_left"] == 0
    for coef in [1.0] + [torch.tensor(1.0, dtype=d) for d in DTYPES]:
        emu.scale(tensors, coef)
        emu.scale_strided([view], coef)
    for t, v in zip(tensors, values):
        assert_same_bits(t, v)
    # The control: the same calls with a coefficient of 2 write.
    writable = [t.clone() for t in tensors]
    emu.scale(writable, torch.tensor(2.0))
    for t, v in zip(writable, values):
        assert_same_bits(t, _opmath_scaled(v, 2.0))


@pytest.mark.parametrize("coef_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_scale_by_a_device_coefficient_of_any_dtype(emu, dtype, coef_dtype):
    gen = torch.Generator().manual_seed(9)
    tensors = _odd_list(dtype, gen)
    tensors.append(torch.tensor([1e-40, -1e-45, 3e38, -0.0, math.inf, -math.inf], dtype=torch.float64).to(dtype))
    original = [t.clone() for t in tensors]
    prefixes = Prefixes(tensors)
    coef = torch.tensor(0.3, dtype=coef_dtype)
    emu.scale(tensors, coef)
    for before, after in zip(original, tensors):
        assert_same_bits(after, _opmath_scaled(before, coef.double().item()))
    prefixes.assert_untouched()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_scale_by_a_coefficient_below_float_normals(emu, dtype):
    """A coefficient that float32 would make subnormal (a clip by a norm
    above 2^126) multiplies in double and rounds once, in both scale
    kernels; at 2^-126 and above the float32 product stays."""
    gen = torch.Generator().manual_seed(21)
    big = torch.tensor([3e38, -2.5e38, 1e30, 1.0, 0.0, math.nan, math.inf], dtype=torch.float64).to(dtype)
    for coef in (1e-39, 3.3e-42, -7e-44, 2.0**-149, 2.0**-126, 0.0):
        tensors = _odd_list(dtype, gen) + [big.clone()]
        tensors = [(t.double() * 1e36).to(dtype) for t in tensors]  # products in float's range
        original = [t.clone() for t in tensors]
        emu.scale(tensors, torch.tensor(coef, dtype=torch.float64))
        for before, after in zip(original, tensors):
            assert_identical(after, _opmath_scaled(before, coef))  # CUDA's half NaN is 0x7fff
        bases, views = _gapped_views(dtype, gen, 3, 2000)
        for b in bases:
            b.copy_((b.double() * 1e36).to(dtype))
        before = [v.clone() for v in views]
        emu.scale_strided(views, torch.tensor(coef, dtype=torch.float64))
        for b, v in zip(before, views):
            assert_identical(v, _opmath_scaled(b, coef))
    # The negative control: a float32 coefficient of 3.3e-42 keeps 12 bits.
    t = torch.tensor([3e38], dtype=torch.float64).to(dtype)
    if dtype == torch.float32:
        assert not torch.equal((t.double() * 3.3e-42).float(), t * torch.tensor(3.3e-42).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_clamp_bits_match_torch_cpu_clamp(emu, dtype):
    gen = torch.Generator().manual_seed(10)
    special = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-40, -1e-40, 0.25, -0.25, 7.0, -7.0],
                           dtype=torch.float64).to(dtype)
    for bound in (0.0, 0.25, 1.0, 1e-42):
        tensors = _odd_list(dtype, gen) + [special.clone()]
        prefixes = Prefixes(tensors)
        expected = [t.clamp(-bound, bound) for t in tensors]
        emu.clamp(tensors, bound)
        for got, want in zip(tensors, expected):
            assert_identical(got, want)
        prefixes.assert_untouched()


def _gapped_views(dtype: torch.dtype, gen: torch.Generator, count: int, elements: int):
    """`count` views with gaps of 1 to 8 dimensions, about `elements` each,
    some transposed; returns (bases, views)."""
    bases, views = [], []
    for i in range(count):
        dims = i % MAX_VIEW_DIMS + 1
        side = max(2, round(elements ** (1.0 / dims)))
        shape = [side + (i + d) % 3 for d in range(dims)]
        shape[-1] *= 2
        base = _values(math.prod(shape), dtype, gen).reshape(shape)
        view = base[..., ::2]
        if dims > 1:
            view = view.transpose(0, dims - 1)
        bases.append(base)
        views.append(view)
    return bases, views


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_strided_views_scaled_in_place_and_gaps_untouched(emu, dtype):
    """16 views with gaps (the most one launch takes), 1 to 8 dimensions,
    ~100,000 elements each on an H200-sized grid (33 blocks per view): every
    element of the views scaled as torch's CPU product, every element in
    their gaps left alone."""
    gen = torch.Generator().manual_seed(11)
    bases, views = _gapped_views(dtype, gen, MAX_VIEWS, 100_000)
    before = [b.clone() for b in bases]
    coef = torch.tensor(0.37, dtype=torch.float64)
    emu.scale_strided(views, coef, num_sms=H200_SMS)
    for b0, b1 in zip(before, bases):
        assert_same_bits(b1[..., ::2], _opmath_scaled(b0[..., ::2], coef.item()))
        assert_same_bits(b1[..., 1::2], b0[..., 1::2])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_clip_with_views_that_have_gaps(emu, dtype):
    """The glue's other clip path: the norm over contiguous copies of the
    views with gaps, the dense tensors scaled from a second table, the
    views through their strides, all by the coefficient in the norm's
    scratch."""
    gen = torch.Generator().manual_seed(17)
    bases, views = _gapped_views(dtype, gen, 5, 3000)
    dense = [_values(n, dtype, gen) for n in (CHUNK + 1, 7)] + [_misaligned(100, dtype, 1, gen)]
    tensors = [dense[0], views[0], dense[1], views[1], views[2], dense[2], views[3], views[4]]
    gaps = [b[..., 1::2].clone() for b in bases]
    expected = ref_norm(tensors)
    c = _check_clip(emu, tensors, max_norm=1.0)
    assert_norm_close(c["total"], expected, dtype)
    assert c["coef"] == pytest.approx(ref_coef(1.0, expected).item(), rel=1e-12)
    for base, gap in zip(bases, gaps):
        assert_same_bits(base[..., 1::2], gap)


def test_empty_lists(emu):
    """launch_norm always launches: an empty table still writes a zero norm
    and coefficient 1; a table of empty tensors likewise."""
    for tensors in ([], [torch.zeros(0)], [torch.zeros(0, dtype=torch.bfloat16), torch.zeros(0, 5)]):
        r = emu.norm(tensors, 2.0)
        assert r["total"].item() == 0.0 and r["chunks"] == 0
        assert torch.equal(r["each"], torch.zeros(len(tensors)))
        c = emu.clip(tensors, 1.0)
        assert c["total"].item() == 0.0 and c["coef"] == 1.0 and c["nonfinite"] == 0
        emu.scale(tensors, 0.5)
        emu.clamp(tensors, 0.5)


def test_clip_scalars_kernel_matches_the_cpu_op_bitwise(emu):
    """The one-thread kernel of clip_scalars_ (inputs of every dtype read on
    the device, absent ones as the glue passes them) against the CPU op on
    400 argument sets: every output and log, bit for bit."""
    for case in clip_scalars_cases():
        got = run_clip_scalars(emu.clip_scalars_, case)
        want = run_clip_scalars(torch.ops.fastclip.clip_scalars_, case)
        for name in want:
            assert_identical(got[name], want[name]), (name, case)
