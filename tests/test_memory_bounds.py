"""The CPU kernels against pages they may not touch (tests/guarded_memory.py,
run in a process of its own: a fault kills that process, not pytest).

Value checks cannot see a vector load past a tensor's end whose extra
lanes are masked, or a scale by exactly 1 that stores what it read (the
op bumps no version then): these can. Found missing in review; the
mutants ``f16c_tail_reads_past_end`` and ``clip_coefficient_one_writes``
(tests/cpu_mutants.py) are each caught only here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastclip
from fastclip import _ops

SCRIPT = Path(__file__).with_name("guarded_memory.py")
TIMEOUT_S = 300

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mprotect on anonymous pages"),
    pytest.mark.skipif(not _ops.has_kernel("cpu"), reason="this build of fastclip has no CPU kernels"),
]


@pytest.mark.parametrize("scenario", ["bounds", "readonly"])
def test_kernels_stay_within_what_they_may_touch(scenario):
    # The child imports the fastclip this process imported (a mutant's copy, say).
    package_root = str(Path(fastclip.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), scenario], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        f"exit status {done.returncode} (-11: SIGSEGV, a touch of a guarded page)\n{done.stdout}\n{done.stderr}")
