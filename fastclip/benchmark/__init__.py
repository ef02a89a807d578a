"""fastclip benchmark: fastclip against torch, side by side, on real models' gradient lists.

    python -m fastclip.benchmark [--device cpu|cuda] [--sets gpt2-124m,10k-small]
        [--dtypes fp32,bf16] [--cases norm,clip] [--quick] [--out DIR]

For each parameter list (the shapes of real architectures, no weights) and
gradient dtype, every case (see cases.py: norm, per-tensor, noclip, clip,
adamw, adamw-noclip) times its methods in one process: torch (foreach, loop and, for
clip_grad_norm_, torch.compile), fastclip's function, fastclip's op on the
gradient list, and for the AdamW step fastclip.ClippedOptimizer. A method
that cannot run is reported with the reason ("unavailable", "failed",
"skipped"), never left out.

Each method is first checked against a float64 reference; then it is timed:
warm-up calls, then repeated calls (median, min and max), perf_counter on
the CPU, CUDA events with the L2 flushed before each call on a GPU.

Per row: the median time; the speedup over torch's foreach path; the ratio
to the floor measured in the same run (timing.Floors: what memory allows for
the bytes the case must move); the host overhead per call (GPU: the CPU time
to enqueue the call; CPU: the time of the same call on a list with the same
number of tensors and dtype but one element per tensor, i.e. everything but
streaming the bytes); the returned norm's error against float64.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Iterator, Optional

import torch

from .. import _ops
from . import cases as _cases
from .cases import CASES, Case, Failed, Method, Skipped, Unavailable, Workload
from .report import (
    CHART_NAME, NUMBERS, OK, Progress, Row, environment, format_table, summary_markdown, write_chart, write_csv, write_json,
)
from .shapes import DEFAULT_SETS, QUICK_SETS, SETS
from .timing import Floors, TimeLimitExceeded, Timer, time_limit

__all__ = ["main", "run", "Row", "SETS", "CASES", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Timing: WARMUP untimed calls (after the checked call, itself a warm-up),
# then at least MIN_REPEATS timed calls and more until TARGET_S seconds are
# spent (at most --repeats calls): ~10 calls of a 40 ms method, 3 of a
# 300 ms one, so that a run of every list stays within minutes.
WARMUP, MIN_REPEATS, MAX_REPEATS, TARGET_S = 1, 3, 25, 0.4
QUICK_WARMUP, QUICK_MIN_REPEATS, QUICK_MAX_REPEATS, QUICK_TARGET_S = 1, 3, 5, 0.05
# The methods of a case are timed in ROUNDS rounds, each a block of a third
# of the repeats and of the time target (plus WARMUP calls) per method, so
# that all of them meet the same moments of a machine whose memory
# bandwidth drifts (see Runner._time_rounds).
ROUNDS, QUICK_ROUNDS = 3, 1
# torch.compile takes 15-30 s per list on a 2-core CPU (once per list and
# dtype, plus one recompile when max_norm changes; over a minute for the
# 995-tensor list); each compile is cut off after COMPILE_TIMEOUT_S, and all
# of them together after COMPILE_BUDGET_S, so that a run stays within
# minutes. Inductor caches its code on disk: a second run compiles in 1-3 s
# what it compiled before.
COMPILE_TIMEOUT_S, COMPILE_BUDGET_S = 30.0, 90.0
# How much of an exception message a "failed" row keeps.
REASON_CHARS = 160


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:REASON_CHARS]


def _is_device_fault(error: BaseException) -> bool:
    """A CUDA error (illegal address and the like), after which the context is unusable."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(error, accelerator_error)) or "CUDA error" in str(error)


@contextlib.contextmanager
def _reported(row: Row) -> Iterator[None]:
    """Run the body; an exception becomes the row's status instead of ending the run."""
    try:
        yield
    except Exception as error:
        if _is_device_fault(error):
            raise  # the context is lost: every later row would fail with it, misattributed
        if isinstance(error, Unavailable):
            status = f"unavailable: {error}"
        elif isinstance(error, Skipped):
            status = f"skipped: {error}"
        elif isinstance(error, Failed):
            status = f"failed: {error}"
        else:
            status = f"failed: {_reason(error)}"
        row.status = status
        for name in NUMBERS:
            setattr(row, name, None)


class Compiler:
    """torch.compile of torch.nn.utils.clip_grad_norm_, bounded in time.

    One compiled function per list, shared by the noclip and clip cases; it
    compiles on its first call and recompiles once when max_norm changes
    (dynamo then makes it a symbolic float). Every call of the compiled
    method runs under a time limit: the per-compile timeout or what is left
    of the run's budget, whichever is smaller.
    """

    def __init__(self, timeout_s: float, budget_s: float, disabled: Optional[str]):
        self.timeout_s, self.left_s, self.disabled = timeout_s, budget_s, disabled
        self.budget_s = budget_s
        self._fn: Optional[Callable] = None
        self.failure: Optional[str] = None

    def new_list(self) -> None:
        """Forget the previous list's compiled code (dynamo keeps at most 8
        entries per function, and a new list would not hit them anyway)."""
        torch._dynamo.reset()
        self._fn, self.failure = None, None

    def build(self, work: Workload) -> _cases.Call:
        if self._fn is None:
            self._fn = torch.compile(torch.nn.utils.clip_grad_norm_)
        fn, params = self._fn, work.params
        return lambda m: fn(params, m)

    @contextlib.contextmanager
    def limit(self, timing: bool = False) -> Iterator[None]:
        """The body under the time limit. ``timing``: a block of timed calls
        of a method that compiled in its check; it gets the per-compile
        timeout and is not charged to the budget, so that a budget running
        out between rounds does not drop a row's earlier blocks (found in
        review)."""
        if self.disabled:
            raise Skipped(self.disabled)
        if self.failure:
            raise Failed(f"{self.failure} (in an earlier case on this list)")
        limit = self.timeout_s if timing else min(self.timeout_s, self.left_s)
        if limit <= 0:
            raise Skipped(f"the run's torch.compile budget of {self.budget_s:.0f} s is spent (--compile-budget)")
        start = time.perf_counter()
        try:
            with time_limit(limit):
                yield
        except TimeLimitExceeded:
            self.failure = (
                f"torch.compile and the compiled calls did not finish within {limit:.0f} s "
                "(--compile-timeout, --compile-budget)"
            )
            torch._dynamo.reset()
            raise Failed(self.failure) from None
        except Exception as error:
            self.failure = _reason(error)
            raise
        finally:
            if not timing:
                self.left_s -= time.perf_counter() - start


class Runner:
    """Runs the cases on one list after another and turns the results into rows."""

    def __init__(self, device: torch.device, timer: Timer, compiler: Compiler, quick: bool, rounds: int = 1):
        self.device, self.timer, self.compiler, self.quick, self.rounds = device, timer, compiler, quick, rounds
        self.floors = Floors(device, timer)
        self.cases = {case.name: case for case in _cases.make_cases(compiler.build)}
        self.progress = Progress(0)

    def steps(self, lists: int, case_names: list[str]) -> int:
        return lists * sum(len(self.cases[name].methods) for name in case_names)

    def run_list(self, set_name: str, dtype_name: str, case_names: list[str]) -> list[Row]:
        shapes = SETS[set_name]()
        work = Workload.create(shapes, DTYPES[dtype_name], self.device)
        floors = self.floors.computed(work.nbytes)  # GPU; on the CPU each case times its own
        floor_calls = self.floors.calls(work.nbytes) if floors is None else {}
        self.compiler.new_list()
        rows: list[Row] = []
        base = dict(set=set_name, dtype=dtype_name, tensors=len(shapes), mbytes=work.nbytes / 1e6)
        for name in case_names:
            case = self.cases[name]
            blocker = _cases.adamw_blocker(work, self.quick) if case.floor == "read+adamw" else None
            if blocker is not None:
                for method in case.methods:
                    self.progress.advance(f"{set_name} {dtype_name}", f"{name} {method.name}")
                    rows.append(Row(case=name, method=method.name, status=f"skipped: {blocker}", **base))
                continue
            small = _cases.tiny_workload(work) if self.device.type == "cpu" else None
            memory = "read" if case.floor == "read+adamw" else case.floor  # the floor's pass over memory
            case_rows, spread = self._run_case(case, work, small, base, floor_calls.get(memory))
            if floors is not None:
                for r in case_rows:
                    if r.status == OK:
                        r.floor_ms = floors[memory]
            if case.floor == "read+adamw":
                alone = next((r for r in case_rows if r.method == "adamw alone" and r.status == OK), None)
                for r in case_rows:
                    if r.status == OK:
                        # Its fastest call, as the read floor's (found in
                        # review: with the median, rows came out under 1x).
                        r.floor_ms = r.floor_ms + alone.min_ms if alone else None
            rows += self._finish(case, case_rows, base, spread)
        return rows

    def _run_case(
        self, case: Case, work: Workload, tiny: Optional[Workload], base: dict, floor: Optional[Callable[[], object]]
    ) -> tuple[list[Row], float]:
        """Check every method, then time them in rounds; returns the rows and
        the spread of the floor over the rounds (ms; 0 without a timed floor)."""
        rows: list[Row] = []
        checked = []
        for method in case.methods:
            self.progress.advance(f"{base['set']} {base['dtype']}", f"{case.name} {method.name}")
            row = Row(case=case.name, method=method.name, status=OK, **base)
            rows.append(row)
            call = self._check(case, method, work, row)
            if call is not None:
                checked.append((row, method, call))
        spread = self._time_rounds(case, work, checked, floor)
        if tiny is not None:
            for row, method, _ in checked:
                if row.status == OK and not method.compiled:  # a compiled method would recompile for other shapes
                    with _reported(row):
                        case.prepare(tiny)
                        small = method.build(tiny)
                        row.host_overhead_ms = self.timer(lambda: small(case.timed_max_norm(tiny)),
                                                          before=tiny.reseed_if_shrunk).median
        return rows, spread

    def _guard(self, method: Method, timing: bool = False):
        return self.compiler.limit(timing) if method.compiled else contextlib.nullcontext()

    def _check(self, case: Case, method: Method, work: Workload, row: Row) -> Optional[_cases.Call]:
        """Build the method and check one call; None (and the row says why) when it cannot be timed."""
        with _reported(row):
            case.prepare(work)
            with self._guard(method):
                call = method.build(work)
                start = time.perf_counter()
                try:
                    row.norm_rel_err = case.check(method, call, work)
                except BaseException:
                    # A failed method may have changed the gradients: the
                    # next check starts from the seeded ones (found in
                    # review: a torch row that scaled them failed the
                    # fastclip rows after it).
                    work.fill_grads()
                    raise
                if method.compiled:
                    row.note = f"first call {time.perf_counter() - start:.1f} s (compile)"
            return call
        return None

    def _time_rounds(
        self, case: Case, work: Workload, checked: list, floor: Optional[Callable[[], object]]
    ) -> float:
        """Time the checked methods in ``self.rounds`` rounds, each method a
        block of calls per round (the first method of a round rotating), the
        floor before every round and after the last. A shared machine's
        memory bandwidth drifts by up to 1.6x within minutes: timing each
        method once, one after the other, compared methods across those
        moments (one run had a row at 0.85x torch that paired runs put at
        1.15x); rounds give every method and the floor the same moments.
        Calls are not interleaved one by one: each would evict the other's
        data from the caches, where back-to-back calls keep theirs alike.
        Each row's floor is the fastest floor call of the case; returns the
        spread of the per-round floors (ms)."""
        times: dict[int, list[float]] = {id(row): [] for row, _, _ in checked}
        host: dict[int, list[float]] = {id(row): [] for row, _, _ in checked}
        floors: list[float] = []
        for r in range(self.rounds + 1):
            if floor is not None:
                floors.append(min(self.timer(floor, min(r, self.rounds - 1), self.rounds).times_ms))
            if r == self.rounds:
                break
            for k in range(len(checked)):
                row, method, call = checked[(k + r) % len(checked)]
                if row.status != OK:
                    continue
                with _reported(row):
                    with self._guard(method, timing=True):
                        sample = self.timer(lambda: call(case.timed_max_norm(work)), r, self.rounds,
                                            before=work.reseed_if_shrunk)
                    times[id(row)] += sample.times_ms
                    host[id(row)] += sample.host_ms
        for row, _, call in checked:
            verify = getattr(call, "verify", None)  # what the timed calls must have done
            if verify is not None and row.status == OK:
                with _reported(row):
                    verify()
            if row.status != OK:
                continue
            sample = times[id(row)]
            row.median_ms, row.min_ms, row.max_ms = statistics.median(sample), min(sample), max(sample)
            row.repeats = len(sample)
            if floors:
                row.floor_ms = min(floors)
            if self.device.type == "cuda":
                row.host_overhead_ms = statistics.median(host[id(row)])
        return max(floors) - min(floors) if floors else 0.0

    @staticmethod
    def _finish(case: Case, rows: list[Row], base: dict, spread: float) -> list[Row]:
        """Speedups over the case's torch baseline and ratios to the floor,
        plus the floor row: the floor of the rows (on a GPU computed, on the
        CPU the fastest floor call of the case, for adamw plus the AdamW step
        alone), its range showing how far the per-round floors drifted."""
        baseline = next((r.median_ms for r in rows if r.method == case.baseline and r.status == OK), None)
        for r in rows:
            if r.status != OK:
                continue
            if baseline is not None:
                r.speedup_vs_torch = baseline / r.median_ms
            if r.floor_ms is not None:
                r.x_floor = r.median_ms / r.floor_ms
        floors = [r.floor_ms for r in rows if r.status == OK and r.floor_ms is not None]
        if floors:
            floor = statistics.median(floors)
            rows.append(
                Row(case=case.name, method="floor", status=OK, median_ms=floor, min_ms=min(floors),
                    max_ms=max(floors) + spread, speedup_vs_torch=baseline / floor if baseline is not None else None,
                    x_floor=1.0, floor_ms=floor, note=case.floor, **base)
            )
        else:
            why = "the adamw alone row failed" if case.floor == "read+adamw" else "no row of the case was timed"
            rows.append(Row(case=case.name, method="floor", status=f"failed: {why}", **base))
        return rows


def _choices(parser: argparse.ArgumentParser, option: str, value: str, allowed) -> list[str]:
    items = [v for v in value.split(",") if v]
    for item in items:
        if item not in allowed:
            parser.error(f"{option}: unknown value {item!r}; choose from {', '.join(allowed)}")
    if not items:
        parser.error(f"{option}: give at least one of {', '.join(allowed)}")
    return items


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastclip.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when there is a GPU, else cpu)")
    parser.add_argument(
        "--sets", default=None,
        help=f"comma-separated, from {', '.join(SETS)} (default: all but tiny; --quick: {', '.join(QUICK_SETS)})",
    )
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=None, help=f"most timed calls per row (default {MAX_REPEATS})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed calls before each block of timed calls (default {WARMUP})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds in which a case's methods are timed in turn (default {ROUNDS}; --quick {QUICK_ROUNDS})")
    parser.add_argument(
        "--compile-timeout", type=float, default=COMPILE_TIMEOUT_S,
        help="seconds one torch.compile may take before its rows report failure (0: do not compile)",
    )
    parser.add_argument("--compile-budget", type=float, default=COMPILE_BUDGET_S,
                        help="seconds all torch.compile calls of the run may take together")
    parser.add_argument("--quick", action="store_true",
                        help="small lists, few repeats, no torch.compile: about a minute")
    parser.add_argument("--out", default=None,
                        help="directory for results.csv, results.json, summary.md and benchmark.png (written after each list)")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="run where fastclip has no kernels for the device (its rows then time the plain-PyTorch fallback)")
    return parser


def _device(parser: argparse.ArgumentParser, value: Optional[str]) -> torch.device:
    """The device to benchmark; a CUDA device with its index (the current
    device's where none is given), which torch.cuda.set_device needs (found
    in review: "cuda", the default on a GPU machine, was refused there)."""
    if value is None:
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        parser.error(f"--device: {value!r} is not a device")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: {value!r}: the benchmark runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {value!r}: torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run(argv: Optional[list[str]] = None) -> tuple[list[Row], dict]:
    """Run the benchmark as the command line would; returns the rows and the environment."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    device = _device(parser, args.device)
    sets = _choices(parser, "--sets", args.sets or ",".join(QUICK_SETS if args.quick else DEFAULT_SETS), SETS)
    dtypes = _choices(parser, "--dtypes", args.dtypes, DTYPES)
    case_names = [c for c in CASES if c in _choices(parser, "--cases", args.cases, CASES)]
    for option, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0), ("--rounds", args.rounds, 1)):
        if value is not None and value < least:
            parser.error(f"{option}: must be at least {least}, got {value}")
    if args.quick:
        warmup, min_repeats, max_repeats, target = QUICK_WARMUP, QUICK_MIN_REPEATS, QUICK_MAX_REPEATS, QUICK_TARGET_S
    else:
        warmup, min_repeats, max_repeats, target = WARMUP, MIN_REPEATS, MAX_REPEATS, TARGET_S
    warmup = warmup if args.warmup is None else args.warmup
    max_repeats = max_repeats if args.repeats is None else args.repeats
    min_repeats = min(min_repeats, max_repeats)
    disabled = None
    if args.quick:
        disabled = "not compiled under --quick (a compile takes 15-30 s per list on a CPU)"
    elif args.compile_timeout <= 0:
        disabled = "not compiled (--compile-timeout 0)"

    if not _ops.has_kernel(device.type) and not args.allow_fallback:
        # Its rows would time the plain-PyTorch fallback under fastclip's
        # name (found in review: a failed CUDA build would have gone unseen).
        why = "the extension is not loaded" if not _ops.available() else f"this build has no {device.type} kernels"
        parser.error(f"--device: {device}: fastclip has no kernels here ({why}); "
                     "pass --allow-fallback to time its plain-PyTorch fallback")
    if device.type == "cuda":
        # CUDA events and the floor's copies go to the current device's
        # stream: it must be the benchmarked one (found in review: with
        # --device cuda:1 the events timed cuda:0).
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device: {device}: torch sees {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)
    timer = Timer(device, warmup, min_repeats, max_repeats, target)
    env = environment(device, argv)
    print(
        f"fastclip benchmark: {env['device_name']} ({device}, {env['threads']} threads), torch {env['torch']}, "
        f"fastclip {env['fastclip']} [{env['fastclip_backend']}]"
        + (f", CPU prefetch: {env['cpu_prefetch']}" if device.type == "cpu" and env["cpu_prefetch"] else ""),
        flush=True,
    )
    rounds = (QUICK_ROUNDS if args.quick else ROUNDS) if args.rounds is None else args.rounds
    rounds = min(rounds, max_repeats)  # every round times at least one call of each method
    runner = Runner(device, timer, Compiler(args.compile_timeout, args.compile_budget, disabled), args.quick, rounds)
    runner.progress = progress = Progress(runner.steps(len(sets) * len(dtypes), case_names))
    settings = {
        "sets": sets, "dtypes": dtypes, "cases": case_names, "rounds": rounds, "warmup": warmup, "min_repeats": min_repeats,
        "max_repeats": max_repeats, "target_s": target, "compile_timeout_s": args.compile_timeout,
        "compile_budget_s": args.compile_budget, "quick": args.quick, "floor": runner.floors.describe(),
    }
    rows: list[Row] = []
    with torch.no_grad():
        for set_name in sets:
            for dtype_name in dtypes:
                try:
                    rows += runner.run_list(set_name, dtype_name, case_names)
                except BaseException:
                    # A device fault (or an interrupt) ends the run: the lists
                    # done so far are kept (found in review: all were lost).
                    if args.out:
                        _write_results(args.out, rows, env, settings, chart=False)
                        print(f"\nstopped in {set_name}/{dtype_name}; the lists before it are in {args.out}/",
                              file=sys.stderr)
                    raise
                if args.out:
                    _write_results(args.out, rows, env, settings, chart=False)
    runner.floors.release()
    progress.close()
    print(format_table(rows))
    if args.out:
        chart = _write_results(args.out, rows, env, settings, chart=True)
        print(f"\nwrote {args.out}/: results.csv, results.json, summary.md, {chart}")
    return rows, env


def _write_results(out: str, rows: list[Row], env: dict, settings: dict, chart: bool) -> str:
    """Writes the rows so far to ``out``; with ``chart`` the chart too. Returns what became of the chart."""
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, "results.csv"))
    write_json(rows, env, settings, os.path.join(out, "results.json"))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(rows))
    if not chart:
        return "no chart yet"
    skipped = write_chart(rows, env, os.path.join(out, CHART_NAME))
    return f"chart skipped: {skipped}" if skipped else CHART_NAME


def main(argv: Optional[list[str]] = None) -> int:
    """0, or 1 when a fastclip method failed its check (found in review: a
    wrong result made a `failed` row and the run still exited 0). torch's
    rows may fail (torch.compile's budget) without failing the run."""
    rows, _ = run(argv)
    wrong = [r for r in rows if r.status.startswith("failed") and not r.method.startswith(("torch", "adamw", "floor"))]
    for r in wrong:
        print(f"fastclip failed: {r.set} {r.dtype} {r.case} {r.method}: {r.status}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
