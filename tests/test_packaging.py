"""The build's decisions and the source distribution (found in review: the
sdist held no headers and no CUDA sources and could not be built)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BUILD_VARIABLES = ("FASTCLIP_CPU_ONLY", "FASTCLIP_FORCE_CUDA")


def _setup_version(env_vars: dict, tmp_path: Path, torch_cuda) -> subprocess.CompletedProcess:
    """`setup.py --version` with these variables, torch.version.cuda set to
    ``torch_cuda`` and torch's CUDA_HOME at ``tmp_path`` (an empty folder
    unless the test made a toolkit there)."""
    env = {k: v for k, v in os.environ.items() if k not in _BUILD_VARIABLES + ("CUDA_HOME", "CUDA_PATH")}
    env.update(env_vars)
    code = ("import sys, runpy, torch, torch.utils.cpp_extension as ext; "
            f"torch.version.cuda = {torch_cuda!r}; ext.CUDA_HOME = {str(tmp_path)!r}; "
            "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "env_vars, torch_cuda, fails, expected, not_expected",
    [
        ({"FASTCLIP_FORCE_CUDA": "1"}, None, True,
         "FASTCLIP_FORCE_CUDA=1 but CUDA cannot be built: torch ", "nvcc was not found"),
        ({}, None, False, "CPU-only build (torch ", "nvcc was not found"),
        ({"FASTCLIP_CPU_ONLY": "true"}, "13.0", False, "CPU-only build (FASTCLIP_CPU_ONLY=1)", None),
        ({"FASTCLIP_CPU_ONLY": "0"}, None, False, "is a CPU-only build", None),
        ({"FASTCLIP_CPU_ONLY": "1", "FASTCLIP_FORCE_CUDA": "1"}, "13.0", True,
         "FASTCLIP_CPU_ONLY and FASTCLIP_FORCE_CUDA are both set", None),
        ({"FASTCLIP_CPU_ONLY": "maybe"}, None, True, "FASTCLIP_CPU_ONLY='maybe': use 1", None),
    ],
    ids=["forced-cpu-torch", "cpu-torch", "cpu-only-true", "cpu-only-0", "both", "unreadable"],
)
def test_build_variables(tmp_path, env_vars, torch_cuda, fails, expected, not_expected):
    done = _setup_version(env_vars, tmp_path, torch_cuda)
    out = done.stdout + done.stderr
    assert expected in out, out
    assert not_expected is None or not_expected not in out, out
    assert (done.returncode != 0) == fails, out


def _fake_toolkit(home: Path, headers: bool) -> Path:
    """A CUDA 13.0 "toolkit" at ``home``: an nvcc that prints its release, and
    cuda_runtime.h when ``headers``."""
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    nvcc.chmod(0o755)
    if headers:
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")
    return nvcc


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script nvcc")
def test_build_finds_the_toolkit_behind_a_wrapper_nvcc(tmp_path):
    # torch takes the parent of nvcc's folder as CUDA_HOME; for a wrapper
    # (/usr/local/bin/nvcc) that has no headers, and the build failed (found
    # in review). The real nvcc's toolkit is taken, for torch's build too.
    real = tmp_path / "real"
    _fake_toolkit(real, headers=True)
    wrapper = tmp_path / "wrapper"
    (wrapper / "bin").mkdir(parents=True)
    (wrapper / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    path = f"{wrapper / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    done = _setup_version({"PATH": path}, wrapper, "13.0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"CUDA + CPU build (CUDA 13.0 at {real})" in done.stdout, done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script nvcc")
def test_build_prefers_a_toolkit_of_torchs_cuda_major_version(tmp_path):
    # Behind a wrapper nvcc, among the toolkits with headers, one whose nvcc
    # has torch's major version, the newest first by number (12.10 after
    # 12.9), not the first found (found in review). /usr/local/cuda-* is
    # replaced by these folders.
    toolkits = {}
    for version in ("13.0", "12.9", "12.10"):
        home = tmp_path / f"cuda-{version}"
        nvcc = _fake_toolkit(home, headers=True)
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.1'\n")
        toolkits[version] = home
    wrapper = tmp_path / "wrapper" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text(f"#!/bin/sh\nexec {toolkits['13.0'] / 'bin' / 'nvcc'} \"$@\"\n")
    (wrapper / "nvcc").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in _BUILD_VARIABLES + ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = f"{wrapper}{os.pathsep}{env.get('PATH', '')}"
    folders = sorted(str(p) for p in toolkits.values())
    code = ("import sys, runpy, glob, torch, torch.utils.cpp_extension as ext; "
            f"glob.glob = lambda pattern: {folders!r} if pattern == '/usr/local/cuda-*' else []; "
            f"torch.version.cuda = '12.8'; ext.CUDA_HOME = {str(wrapper.parent)!r}; "
            "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"CUDA + CPU build (CUDA 12.8 at {toolkits['12.10']})" in done.stdout, done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script nvcc")
@pytest.mark.parametrize("force", ["0", "1"])
def test_build_without_headers_where_cuda_home_says_is_cpu_only(tmp_path, force):
    _fake_toolkit(tmp_path, headers=False)
    done = _setup_version({"CUDA_HOME": str(tmp_path), "FASTCLIP_FORCE_CUDA": force}, tmp_path, "13.0")
    out = done.stdout + done.stderr
    assert f"the CUDA toolkit at {tmp_path} (CUDA_HOME) has no include/cuda_runtime.h" in out, out
    assert (done.returncode != 0) == (force == "1"), out
    assert force == "1" or "CPU-only build" in out, out


@pytest.mark.skipif(sys.platform == "win32", reason="a shell-script nvcc")
def test_unreadable_force_cuda_is_refused_where_cuda_can_be_built(tmp_path):
    # It was read only when CUDA could not be built (found in review).
    _fake_toolkit(tmp_path, headers=True)
    assert _setup_version({}, tmp_path, "13.0").returncode == 0  # CUDA can be built here
    done = _setup_version({"FASTCLIP_FORCE_CUDA": "bogus"}, tmp_path, "13.0")
    assert done.returncode != 0
    assert "FASTCLIP_FORCE_CUDA='bogus': use 1" in done.stdout + done.stderr


def test_sdist_holds_every_source_it_builds_from(tmp_path):
    """Every header, CUDA and C++ source, the CMake check, the license and
    the tests go into the sdist, whatever torch the machine that made it has."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "build", "docs", "*.so", "__pycache__", "*.egg-info", ".pytest_cache"))
    env = {k: v for k, v in os.environ.items() if k not in _BUILD_VARIABLES}
    env["FASTCLIP_CPU_ONLY"] = "1"  # the CPU sources are the only ones setup.py would name
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (archive,) = (tmp_path / "dist").glob("fastclip-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    wanted |= {str(p.relative_to(ROOT)) for pattern in ("*.py", "*.h", "*.cpp") for p in (ROOT / "tests").rglob(pattern)}
    wanted |= {"LICENSE", "README.md", "CMakeLists.txt", "setup.py", "pyproject.toml", "fastclip/py.typed"}
    assert not wanted - names, sorted(wanted - names)


def _elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file."""
    import struct

    data = path.read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        pytest.skip("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # (name offset, file offset) of section i
        base = shoff + i * shentsize
        return struct.unpack_from("<I", data, base)[0], struct.unpack_from("<Q", data, base + 0x18)[0]

    strtab = header(shstrndx)[1]
    return {data[strtab + name:data.index(b"\0", strtab + name)].decode() for name, _ in map(header, range(shnum))}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the module as ELF")
def test_module_carries_no_debug_info():
    # Python's CFLAGS hold -g; setup.py's -g0 comes after it (found in
    # review: the module was 19 MB, most of it debug info).
    import fastclip
    from fastclip import _ops

    if not _ops.available():
        pytest.skip("the extension is not built")
    sections = _elf_section_names(Path(fastclip._C.__file__))
    assert ".text" in sections  # the parse found the module's sections
    assert not {s for s in sections if s.startswith(".debug_")}, sorted(sections)


def _fastclip_ops_with_kernels(key: str) -> set[str]:
    import torch

    return {n for n in torch._C._dispatch_get_registrations_for_dispatch_key(key) if n.startswith("fastclip::")}


def test_every_op_has_a_kernel_for_each_device_the_build_names():
    """Every op has a CPU kernel, and a CUDA kernel in a CUDA build: checked
    without a GPU too (a CUDA build of torch on a machine without one)."""
    import torch
    from fastclip import _ops

    if not _ops.available():
        pytest.skip("the extension is not built")
    ops = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastclip::")}
    assert len(ops) == 5, sorted(ops)
    assert _fastclip_ops_with_kernels("CPU") == ops
    cuda_ops = _fastclip_ops_with_kernels("CUDA")
    if _ops.build_info()["cuda_build"]:
        assert cuda_ops == ops
    else:
        assert not cuda_ops
