"""The mutation checks (tests/cpu_mutants.py, tests/cuda_emu/mutants.py)
take minutes per mutant and are run by hand; a mutant whose text is no
longer in its file stops them. This cheap check runs with the suite (found
in review: two CPU mutants had gone stale after clip.py was rewritten, and
the script stopped after 18 of 38)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    sys.path.insert(0, str(ROOT / "tests"))  # both import tests/mutation.py
    try:
        spec = importlib.util.spec_from_file_location(f"_mutants_{path.parent.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "tests"))


def _cases():
    cpu = _load(ROOT / "tests" / "cpu_mutants.py")
    for name, (file, _, old, new) in cpu.MUTANTS.items():
        yield pytest.param(ROOT / file, old, new, id=f"cpu-{name}")
    cuda = _load(ROOT / "tests" / "cuda_emu" / "mutants.py")
    for name, (_, old, new) in cuda.MUTANTS.items():
        yield pytest.param(cuda.SOURCE, old, new, id=f"cuda-{name}")


@pytest.mark.parametrize("path, old, new", list(_cases()))
def test_mutant_text_is_in_its_file_once(path, old, new):
    assert path.read_text().count(old) == 1, f"{path.name} no longer holds {old!r} once"
    assert new != old
