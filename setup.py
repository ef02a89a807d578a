"""Builds fastclip._C with torch.utils.cpp_extension.

CUDA kernels are compiled when this torch is a CUDA build and nvcc is found;
otherwise the extension is CPU-only. Environment overrides:
  FASTCLIP_CPU_ONLY=1    never compile CUDA sources
  FASTCLIP_FORCE_CUDA=1  compile CUDA sources, and fail instead of falling back
                         to a CPU-only build when that is not possible
  TORCH_CUDA_ARCH_LIST   GPU architectures, as for any torch extension (default:
                         those of the visible GPUs; "9.0" for an H100/H200)
  MAX_JOBS               parallel compile jobs (ninja)
Install with `pip install --no-build-isolation .` so that the build uses the
torch that is installed (an isolated build stops with a message that says so).
"""
import glob
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as error:
    raise RuntimeError(
        "fastclip builds against the installed torch: install torch first, then run "
        "`pip install --no-build-isolation .`"
    ) from error

ROOT = Path(__file__).resolve().parent
_VERSION_INFO = runpy.run_path(str(ROOT / "fastclip" / "_version.py"))  # plain Python, no imports
VERSION = _VERSION_INFO["__version__"]
if _VERSION_INFO["torch_release"](torch.__version__) < _VERSION_INFO["MIN_TORCH"]:
    # Before a build of minutes whose result the import would refuse.
    raise RuntimeError(
        f"fastclip needs torch >= {'.'.join(map(str, _VERSION_INFO['MIN_TORCH']))}, found torch "
        f"{torch.__version__}: upgrade torch first"
    )


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _env(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value not in _TRUE + _FALSE:  # found in review: "true" was silently read as unset
        raise RuntimeError(f"{name}={os.environ[name]!r}: use 1 (or true, yes, on) or 0 (false, no, off)")
    return value in _TRUE


def _nvcc_at(home: str) -> str:
    return os.path.join(home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")


def _nvcc_release(home: str):
    """(major, minor) of the nvcc under ``home`` as strings, None when it
    does not say; raises OSError or SubprocessError when it does not run."""
    shown = subprocess.run([_nvcc_at(home), "--version"], capture_output=True, text=True, timeout=120).stdout
    release = re.search(r"release (\d+)\.(\d+)", shown)
    return None if release is None else (release.group(1), release.group(2))


def _nvcc_mismatch() -> str:
    """Why CUDA_HOME's nvcc cannot build against this torch, or "". torch's
    BuildExtension refuses an nvcc whose CUDA major version differs from
    torch's (a PyPI torch built for CUDA 12 next to a CUDA 13 toolkit): it
    would fail the whole install instead of giving a CPU-only build."""
    try:
        release = _nvcc_release(cpp_extension.CUDA_HOME)
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvcc at {_nvcc_at(cpp_extension.CUDA_HOME)} did not run ({error})"
    if release is None:  # torch then skips its check too
        return ""
    torch_major = torch.version.cuda.split(".")[0]
    if release[0] != torch_major:
        return (f"nvcc {release[0]}.{release[1]} at {cpp_extension.CUDA_HOME} and torch's CUDA {torch.version.cuda} "
                f"differ in major version, which torch cannot build with: set CUDA_HOME to a CUDA {torch_major} toolkit")
    return ""


def _same_major(home: str) -> bool:
    try:
        release = _nvcc_release(home)
    except (OSError, subprocess.SubprocessError):
        return False
    return release is not None and release[0] == torch.version.cuda.split(".")[0]


def _has_headers(home: str) -> bool:
    return os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _toolkit_headers() -> str:
    """Why the CUDA toolkit torch found has no headers, or "" once it has.
    Without CUDA_HOME in the environment torch takes the parent of nvcc's
    folder; where nvcc is a wrapper script (/usr/local/bin/nvcc that runs the
    real one) that is /usr/local, and the build failed on a missing
    cuda_runtime.h (found in review). The first toolkit with headers among
    the real nvcc's, /usr/local/cuda and /usr/local/cuda-* is taken then
    (for torch's build too: it reads cpp_extension.CUDA_HOME)."""
    home = cpp_extension.CUDA_HOME
    if _has_headers(home):
        return ""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):  # the user's choice stands
        return f"the CUDA toolkit at {home} (CUDA_HOME) has no include/cuda_runtime.h"
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    with_headers = [c for c in dict.fromkeys(candidates) if _has_headers(c)]
    # One whose nvcc has torch's CUDA major version first, in that order
    # (found in review: cuda-13.0 was taken next to torch's 12.8 and a cuda-12.8).
    with_headers.sort(key=lambda c: not _same_major(c))
    if with_headers:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = with_headers[0]
        return ""
    return f"the CUDA toolkit at {home} has no include/cuda_runtime.h (set CUDA_HOME)"


def _version_key(path: str) -> tuple:
    """(12, 10) for /usr/local/cuda-12.10: numerically, not as text (12.10 after 12.9)."""
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(path)))


def _cuda_decision() -> tuple[bool, str]:
    # Both read first: a value that cannot be read is an error whatever the other says.
    cpu_only, force = _env("FASTCLIP_CPU_ONLY"), _env("FASTCLIP_FORCE_CUDA")
    if cpu_only:
        if force:
            raise RuntimeError("FASTCLIP_CPU_ONLY and FASTCLIP_FORCE_CUDA are both set: set one")
        return False, "FASTCLIP_CPU_ONLY=1"
    missing = []
    if torch.version.cuda is None:
        # torch leaves CUDA_HOME unset then, wherever nvcc is (found in
        # review: the message also said nvcc was not found).
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    elif cpp_extension.CUDA_HOME is None:
        missing.append("nvcc was not found (set CUDA_HOME)")
    else:
        problem = _toolkit_headers() or _nvcc_mismatch()
        if problem:
            missing.append(problem)
    if missing:
        if force:
            raise RuntimeError("FASTCLIP_FORCE_CUDA=1 but CUDA cannot be built: " + "; ".join(missing))
        return False, "; ".join(missing)
    return True, f"CUDA {torch.version.cuda} at {cpp_extension.CUDA_HOME}"


def _openmp_flags() -> list[str]:
    # at::parallel_for is a header template whose OpenMP pragma is compiled
    # into the extension: without -fopenmp it silently runs on one thread.
    # Compile-only: GOMP symbols then resolve to the libgomp torch already
    # loaded (no second OpenMP runtime with its own thread pool).
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        return ["-fopenmp"]
    return []


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def extension():
    with_cuda, why = _cuda_decision()
    print(f"fastclip: {'CUDA + CPU' if with_cuda else 'CPU-only'} build ({why})")
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # A changed header, or this file (its flags), rebuilds the extension.
    headers = _sources("csrc/**/*.h") + ["setup.py"]
    defines = [f'-DFASTCLIP_VERSION="{VERSION}"']
    # -O3 for the vectorizer; no fast-math: NaN/inf must propagate exactly.
    # -g0 after Python's own -g: its debug info made the module ~10x larger.
    cxx = ["-O3", "-g0"] + defines + _openmp_flags()
    if not with_cuda:
        return CppExtension("fastclip._C", sources, depends=headers, extra_compile_args={"cxx": cxx})
    # The framework-free kernels (*.cu, nvcc) and the torch glue
    # (multi_tensor_cuda.cpp, host compiler) that registers them for CUDA.
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    cuda_defines = ["-DFASTCLIP_WITH_CUDA"]
    # Never --use_fast_math: it flushes subnormals and lets NaN/inf through
    # approximations; the norms are held to float64 references. -lineinfo
    # maps profiler samples to source lines at no runtime cost.
    nvcc = ["-O3", "-lineinfo"] + defines + cuda_defines
    return CUDAExtension(
        "fastclip._C", sources, depends=headers, extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": nvcc}
    )


setup(
    name="fastclip",
    version=VERSION,
    packages=find_packages(include=["fastclip", "fastclip.*"]),
    # PEP 561: the package's annotations are its types (mypy, pyright).
    package_data={"fastclip": ["py.typed"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
