"""Shared by the mutation checks (tests/cpu_mutants.py,
tests/cuda_emu/mutants.py): what counts as a planted bug being caught."""
from __future__ import annotations

import subprocess
from typing import Callable, List


def verdict(done: subprocess.CompletedProcess) -> str:
    """'caught: ...' only for failed tests (pytest's exit 1 with failures
    and no errors) or a test process killed by a signal (a stray memory
    access, an alignment trap); a build or collection error is not a catch."""
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    if done.returncode < 0:
        return f"caught: test process killed by signal {-done.returncode}"
    if done.returncode == 1 and " failed" in summary and " error" not in summary:
        failed = [line for line in lines if line.startswith("FAILED")]
        return f"caught: {summary}" + (f"; first: {failed[0]}" if failed else "")
    return f"not caught (exit {done.returncode}): {summary or done.stderr[-300:]}"


HANG_FACTOR = 3  # a mutant's run this many times the unmodified run's time is a hang
MIN_HANG_S = 300


def hang_timeout(control_s: float) -> int:
    """Seconds after which a run against a mutant counts as a hang: from the
    unmodified run's time on this machine, not a fixed figure (found in
    review: a fixed 900 s let a loaded machine's slow run count as caught)."""
    return max(MIN_HANG_S, int(HANG_FACTOR * control_s))


def attempt(run_tests: Callable[[], subprocess.CompletedProcess], timeout_s: int) -> str:
    """The verdict of one run of the tests against a mutant; a hang counts as
    caught, and says so."""
    try:
        return verdict(run_tests())
    except subprocess.TimeoutExpired:
        return f"caught (a hang): no result within {timeout_s} s"


def report(missed: List[str], name: str, line: str, result: str) -> None:
    """Prints one mutant's line; a mutant not caught joins `missed`."""
    print(line, flush=True)
    if not result.startswith("caught"):
        missed.append(name)


def finish(missed: List[str], not_run: List[str] = ()) -> int:
    print(f"{len(missed)} missed" + (f": {', '.join(missed)}" if missed else ""))
    if not_run:
        print(f"{len(not_run)} not run on this machine: {', '.join(not_run)}")
    return 1 if missed else 0
