"""The benchmark as a product: one quick CPU run on the tiny list writes the
promised CSV/JSON/PNG, every method of every case gets a row (unavailable
and failing methods included), and its correctness checks can fail."""
from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch

import fastclip
from fastclip import benchmark
from fastclip.benchmark import cases, report, timing

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_RUN = ["--device", "cpu", "--sets", "tiny", "--quick"]
ENVIRONMENT_KEYS = {
    "date", "command", "device", "device_name", "cpu", "threads", "fastclip", "fastclip_backend",
    "git_commit", "torch", "cuda", "python", "platform", "cpu_prefetch",
}


def _row(rows, case, method, dtype="fp32"):
    found = [r for r in rows if r.case == case and r.method == method and r.dtype == dtype]
    assert len(found) == 1, f"expected one {case}/{method}/{dtype} row, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    start = time.perf_counter()
    rows, env = benchmark.run([*TINY_RUN, "--out", str(out)])
    return rows, env, out, time.perf_counter() - start


def test_quick_tiny_run_is_fast(quick_run):
    *_, seconds = quick_run
    assert seconds < 60, f"--quick on the tiny list took {seconds:.0f} s"


def test_every_method_of_every_case_has_a_row(quick_run):
    rows, *_ = quick_run
    for case in cases.make_cases(lambda work: None):
        for dtype in ("fp32", "bf16"):
            for method in case.methods:
                row = _row(rows, case.name, method.name, dtype)
                assert row.status == "ok" or row.status.split(":")[0] in ("failed", "unavailable", "skipped"), row
            assert _row(rows, case.name, "floor", dtype).status == "ok"


def test_methods_that_run_pass_their_checks(quick_run):
    rows, *_ = quick_run
    failed = [(r.case, r.method, r.status) for r in rows if r.status.startswith("failed")]
    assert failed == []
    for r in rows:
        if r.status == "ok" and r.method != "floor":
            assert r.median_ms > 0 and r.min_ms <= r.median_ms <= r.max_ms and r.repeats >= 1
            assert r.host_overhead_ms is not None and r.x_floor > 0 and r.speedup_vs_torch > 0


def test_each_cpu_row_is_compared_with_a_floor_timed_alongside_it(quick_run):
    """The floor is timed around every round of a case's methods; its rows
    share the fastest floor call (for adamw plus the AdamW step alone), and
    the case's floor row gives it, its range the drift over the rounds."""
    rows, *_ = quick_run
    for case in cases.make_cases(lambda work: None):
        for dtype in ("fp32", "bf16"):
            timed = [r for r in rows if r.case == case.name and r.dtype == dtype and r.status == "ok"
                     and r.method != "floor"]
            floor = _row(rows, case.name, "floor", dtype)
            for r in timed:
                assert r.floor_ms > 0 and r.x_floor == pytest.approx(r.median_ms / r.floor_ms), r
                assert r.floor_ms == floor.median_ms
            assert floor.min_ms == floor.median_ms <= floor.max_ms


def _logging_norm_methods(monkeypatch, log, fail_on_call=None):
    """The norm case's methods replaced by three that log their calls; the
    read floor logs too. Method "b" raises on its call number ``fail_on_call``."""

    def method(name):
        def build(w):
            calls = []

            def call(m):
                calls.append(1)
                if name == "b" and len(calls) == fail_on_call:
                    raise RuntimeError("b broke")
                log.append(name)
                return fastclip.get_total_norm(w.grads)

            return call

        return cases.Method(name, "fastclip", build)

    monkeypatch.setattr(cases, "_norm_methods", lambda: [method("torch foreach"), method("b"), method("c")])
    real_calls = timing.Floors.calls

    def calls(self, nbytes):
        read = real_calls(self, nbytes)["read"]
        return {"read": lambda: (log.append("floor"), read())[1]}

    monkeypatch.setattr(timing.Floors, "calls", calls)


ROUNDS_RUN = ["--device", "cpu", "--sets", "tiny", "--dtypes", "fp32", "--cases", "norm", "--warmup", "0"]


def test_methods_are_timed_in_rounds(monkeypatch):
    """Every method is checked first; then each round times a block of each,
    the first method of a round rotating, with the floor before every round
    and after the last, so all meet the same moments."""
    log = []
    _logging_norm_methods(monkeypatch, log)
    rows, _ = benchmark.run([*ROUNDS_RUN, "--rounds", "3", "--repeats", "3"])
    t, f = "torch foreach", "floor"
    assert log[:16] == [t, "b", "c", f, t, "b", "c", f, "b", "c", t, f, "c", t, "b", f]
    for name in (t, "b", "c"):
        assert _row(rows, "norm", name).repeats == 3


@pytest.mark.parametrize("repeats,rounds", [(5, 3), (25, 4), (1, 3)])
def test_repeats_is_the_most_calls_per_row_over_all_rounds(repeats, rounds):
    rows, _ = benchmark.run([*ROUNDS_RUN, "--rounds", str(rounds), "--repeats", str(repeats)])
    for r in rows:
        if r.method != "floor":
            assert r.status == "ok" and min(repeats, 3) <= r.repeats <= repeats, r


def test_many_repeats_start_the_clips_over(monkeypatch):
    """Each timed clip shrinks the gradients by CLIP_DECAY; with enough
    repeats fp16 values went subnormal, then zero (a clip that writes
    nothing). Every timed call, host-overhead ones included, must clip
    gradients shrunk less than RESEED_SHRINK from where the case's clips
    started, and go on clipping (coefficient below 1)."""
    shrink = []
    real = cases.Workload.next_max_norm

    def logged(self):
        shrink.append(self.clip_target / self.clip_start)
        return real(self)

    monkeypatch.setattr(cases.Workload, "next_max_norm", logged)
    monkeypatch.setattr(benchmark, "TARGET_S", 1e9)  # the repeats alone decide how many calls
    repeats = 400  # 0.99^400 = 0.018: every block would pass RESEED_SHRINK without a reseed
    rows, _ = benchmark.run(["--device", "cpu", "--sets", "tiny", "--dtypes", "fp16", "--cases", "clip,adamw",
                             "--warmup", "0", "--rounds", "1", "--repeats", str(repeats), "--compile-timeout", "0"])
    timed = [r for r in rows if r.method != "floor" and r.status == "ok"]
    assert len(timed) >= 5 and all(r.repeats == repeats for r in timed), rows
    assert len(shrink) > 4 * repeats
    assert min(shrink) >= cases.RESEED_SHRINK, min(shrink)


def test_a_method_failing_in_a_later_round(monkeypatch):
    """Its row says why and keeps no numbers; the other rows and the floor are timed."""
    log = []
    _logging_norm_methods(monkeypatch, log, fail_on_call=3)  # the check, round 1's call, then round 2
    rows, _ = benchmark.run([*ROUNDS_RUN, "--rounds", "3", "--repeats", "3"])
    broken = _row(rows, "norm", "b")
    assert broken.status == "failed: RuntimeError: b broke"
    assert broken.median_ms is None and broken.norm_rel_err is None and broken.repeats is None
    assert log.count("b") == 2
    for name in ("torch foreach", "c", "floor"):
        assert _row(rows, "norm", name).status == "ok"
    assert _row(rows, "norm", "c").speedup_vs_torch > 0


def test_compile_row_says_why_it_was_skipped(quick_run):
    rows, *_ = quick_run
    assert _row(rows, "clip", "torch compile").status.startswith("skipped: not compiled under --quick")


def test_csv_columns_and_rows(quick_run):
    rows, _, out, _ = quick_run
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        written = list(reader)
    assert reader.fieldnames == report.COLUMNS
    assert {"median_ms", "min_ms", "max_ms", "speedup_vs_torch", "x_floor", "host_overhead_ms", "status"} <= set(
        report.COLUMNS
    )
    assert len(written) == len(rows)
    assert [(w["case"], w["method"], w["status"]) for w in written] == [(r.case, r.method, r.status) for r in rows]


def test_json_has_environment_settings_and_rows(quick_run):
    rows, env, out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    assert ENVIRONMENT_KEYS <= set(data["environment"])
    assert data["environment"]["fastclip"] == fastclip.__version__
    assert data["environment"]["device"] == "cpu"
    info = fastclip.build_info()
    assert data["environment"]["cpu_prefetch"] == f"{info['cpu_prefetch']} (decided by {info['cpu_prefetch_decided_by']})"
    assert data["settings"]["sets"] == ["tiny"] and data["settings"]["quick"] is True
    assert len(data["rows"]) == len(rows)
    assert set(data["rows"][0]) == set(report.COLUMNS)


def test_chart_is_a_png(quick_run):
    *_, out, _ = quick_run
    pytest.importorskip("matplotlib")
    assert (out / report.CHART_NAME).read_bytes()[:8] == PNG_SIGNATURE


def test_chart_leaves_out_rows_without_a_floor(tmp_path):
    """A row timed next to a failed floor has a speedup but no ratio to the
    floor: the chart draws what there is (it raised TypeError, found in review)."""
    pytest.importorskip("matplotlib")
    rows, env = benchmark.run([*TINY_RUN, "--dtypes", "fp32", "--cases", "norm"])
    timed = [r for r in rows if r.status == "ok" and r.method != "floor"]
    assert timed and all(r.x_floor is not None for r in timed)
    timed[0].x_floor = None
    assert report.write_chart(rows, env, str(tmp_path / "chart.png")) is None
    assert (tmp_path / "chart.png").read_bytes().startswith(PNG_SIGNATURE)


def test_run_without_matplotlib_says_the_chart_was_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib now raises ImportError
    benchmark.run([*TINY_RUN, "--dtypes", "fp32", "--cases", "norm", "--out", str(tmp_path)])
    assert "chart skipped: matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "results.csv").exists() and not (tmp_path / report.CHART_NAME).exists()


def test_missing_wrapper_is_reported_not_dropped(tmp_path, monkeypatch):
    monkeypatch.delattr(fastclip, "ClippedOptimizer", raising=False)
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "fp32", "--cases", "adamw", "--out", str(tmp_path)])
    row = _row(rows, "adamw", "ClippedOptimizer")
    assert row.status == f"unavailable: fastclip {fastclip.__version__} has no ClippedOptimizer"
    assert row.median_ms is None
    assert "ClippedOptimizer" in (tmp_path / "results.csv").read_text()
    for other in ("adamw alone", "torch foreach+adamw", "fastclip+adamw"):
        assert _row(rows, "adamw", other).status == "ok"


@pytest.mark.skipif(not hasattr(fastclip, "ClippedOptimizer"), reason="this fastclip has no ClippedOptimizer yet")
def test_wrapper_row_is_timed_when_available():
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "fp32", "--cases", "adamw"])
    assert _row(rows, "adamw", "ClippedOptimizer").status == "ok"


def test_fp16_adamw_rows_pass_on_a_large_tensor(monkeypatch):
    """The AdamW case clipped to a fixed max_norm of 1e-3, which made a
    clipped fp16 gradient of a million elements subnormal (~1e-6): both
    clip-then-step rows failed their check. The target is now a fraction of
    the list's norm."""
    monkeypatch.setitem(benchmark.SETS, "tiny", lambda: [(1 << 20,), (3, 5)])
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "fp16", "--cases", "adamw"])
    for method in ("adamw alone", "torch foreach+adamw", "fastclip+adamw", "ClippedOptimizer"):
        assert _row(rows, "adamw", method, "fp16").status == "ok"


def test_wrong_results_fail_instead_of_being_timed(monkeypatch):
    """Negative control: a clip that does not scale and a step that ignores
    the clip are caught by the checks."""
    monkeypatch.setattr(fastclip, "clip_grad_norm_", lambda params, max_norm: fastclip.get_total_norm(
        [p.grad for p in params]))
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "fp32", "--cases", "clip,adamw"])
    assert _row(rows, "clip", "fastclip").status.startswith("failed: an element after clipping")
    assert _row(rows, "clip", "fastclip").median_ms is None
    assert _row(rows, "adamw", "fastclip+adamw").status.startswith("failed: parameters after one step")
    assert _row(rows, "clip", "fastclip op").status == "ok"


def _last_tensor(params):
    return [params[-1].grad]


def _tail_of_each(params):
    return [p.grad.reshape(-1)[-16:] for p in params]


@pytest.mark.parametrize("shapes, kept", [([(64,)] * 200, _last_tensor), ([(64, 64)] * 4, _tail_of_each)],
                         ids=["last_of_200_tensors", "tail_of_every_tensor"])
def test_elements_left_unscaled_fail_the_clip_row(monkeypatch, shapes, kept):
    """Negative controls: a bf16 clip that leaves its last tensor of many
    unscaled moves the total norm by less than bf16's tolerance (found in
    review: 10 of 10,000 passed), and one that leaves the last 0.4% of every
    tensor unscaled moves each tensor's norm by less (found in review); the
    check of every element catches both."""
    monkeypatch.setitem(benchmark.SETS, "tiny", lambda: shapes)
    real = fastclip.clip_grad_norm_

    def clip_but_keep(params, max_norm):
        params = list(params)
        saved = [(part, part.clone()) for part in kept(params)]
        total = real(params, max_norm)
        for part, old in saved:
            part.copy_(old)
        return total

    monkeypatch.setattr(fastclip, "clip_grad_norm_", clip_but_keep)
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "bf16", "--cases", "clip"])
    assert _row(rows, "clip", "fastclip", "bf16").status.startswith("failed: an element after clipping")
    assert _row(rows, "clip", "fastclip op", "bf16").status == "ok"


def test_noclip_check_sees_negated_gradients(monkeypatch):
    """Negative control (found in review): negated gradients have the same
    per-tensor norms, which the check compared before."""
    def negates(params, max_norm):
        total = fastclip.get_total_norm([p.grad for p in params])
        for p in params:
            p.grad.neg_()
        return total

    monkeypatch.setattr(fastclip, "clip_grad_norm_", negates)
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "bf16", "--cases", "noclip"])
    assert _row(rows, "noclip", "fastclip", "bf16").status == "failed: the gradients changed although no clipping was needed"
    assert _row(rows, "noclip", "fastclip op", "bf16").status == "ok"


def test_a_failed_torch_row_does_not_fail_the_rows_after_it(monkeypatch):
    """Found in review: a torch row that scaled the gradients in the noclip
    case left them so, and the fastclip checks after it failed."""
    def scales(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
        grads = [p.grad for p in parameters]
        total = torch.nn.utils.get_total_norm(grads)
        torch._foreach_mul_(grads, 0.9)
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", scales)
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "fp32", "--cases", "noclip,clip"])
    assert _row(rows, "noclip", "torch foreach").status.startswith("failed:")
    for case in ("noclip", "clip"):
        assert _row(rows, case, "fastclip").status == "ok"
        assert _row(rows, case, "fastclip op").status == "ok"


def test_exit_status_fails_when_a_fastclip_row_fails(monkeypatch, tmp_path):
    """A wrong result makes a `failed` row and a non-zero exit (found in
    review: the run exited 0); a correct run exits 0."""
    argv = [*TINY_RUN, "--dtypes", "fp32", "--cases", "clip", "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    monkeypatch.setattr(fastclip, "clip_grad_norm_", lambda params, max_norm: fastclip.get_total_norm(
        [p.grad for p in params]))
    assert benchmark.main(argv) == 1


@pytest.mark.skipif(not hasattr(fastclip, "ClippedOptimizer"), reason="this fastclip has no ClippedOptimizer yet")
def test_wrapper_steps_skipped_while_timed_fail_the_row(monkeypatch):
    """Negative control: the check is a first step; timed steps that the
    wrapper skips (they move no memory) must fail the row, not be timed."""
    real_step = fastclip.ClippedOptimizer.step

    def step_skipped_once_checked(self, closure=None):
        if self.optimizer.state:  # a timed step: the check's first step has no state yet
            self.skipped_steps.add_(1)
            return None
        return real_step(self, closure)

    monkeypatch.setattr(fastclip.ClippedOptimizer, "step", step_skipped_once_checked)
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "fp32", "--cases", "adamw"])
    row = _row(rows, "adamw", "ClippedOptimizer")
    assert row.status.startswith("failed:") and "timed steps were skipped" in row.status and row.median_ms is None
    assert _row(rows, "adamw", "fastclip+adamw").status == "ok"


def test_noclip_check_sees_a_write(monkeypatch):
    def scales_anyway(params, max_norm):
        total = fastclip.get_total_norm([p.grad for p in params])
        for p in params:
            p.grad.mul_(0.5)
        return total

    monkeypatch.setattr(fastclip, "clip_grad_norm_", scales_anyway)
    rows, _ = benchmark.run([*TINY_RUN, "--dtypes", "fp32", "--cases", "noclip,adamw-noclip"])
    wrote = "failed: the gradients changed although no clipping was needed"
    assert _row(rows, "noclip", "fastclip").status == wrote
    assert _row(rows, "adamw-noclip", "fastclip+adamw").status == wrote
    assert _row(rows, "adamw-noclip", "ClippedOptimizer").status == "ok"


def test_time_limit_interrupts():
    start = time.perf_counter()
    with pytest.raises(timing.TimeLimitExceeded):
        with timing.time_limit(0.2) as enforced:
            assert enforced
            # Busy, but not a bare `while <condition>: pass`: Python 3.13 loses
            # the handler of an exception a signal raises there (CPython #130279).
            while True:
                if time.perf_counter() - start > 10:
                    break
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--sets", "no-such-set"], "--sets"),
        (["--dtypes", "fp8"], "--dtypes"),
        (["--cases", "sgd"], "--cases"),
        (["--device", "tpu"], "--device"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_arguments_are_named(argv, option, capsys):
    with pytest.raises(SystemExit):
        benchmark.run(argv)
    # The error line itself (argparse's usage line above it lists every option).
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error and f"error: {option}" in error[-1], error


def test_layout_diagnostic_writes_every_layout(tmp_path, capsys):
    from fastclip.benchmark import layout

    assert layout.main(["--count", "40", "--dtype", "bf16", "--rounds", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "layout.json").read_text())
    assert data["count"] == 40 and data["dtype"] == "bfloat16"
    assert set(data["rows"]) == {"flat", "views", "separate", "interleaved", "torch floor (flat)"}
    for row in data["rows"].values():
        assert row["norm_ms"] > 0 and row["clip_ms"] > 0
    assert "| interleaved |" in capsys.readouterr().out


def test_orders_diagnostic_times_every_order(tmp_path, capsys):
    from fastclip.benchmark import orders

    argv = ["--sets", "tiny", "--dtypes", "fp32,bf16", "--orders", "2,1,inf,3.5", "--rounds", "1", "--out", str(tmp_path)]
    assert orders.main(argv) == 0
    data = json.loads((tmp_path / "orders.json").read_text())
    assert [(r["dtype"], r["order"]) for r in data["rows"]] == [
        (d, o) for d in ("fp32", "bf16") for o in (2.0, 1.0, math.inf, 3.5)]
    for row in data["rows"]:
        assert row["fastclip_ms"] > 0 and row["torch_ms"] > 0
        assert row["fastclip_rel_err"] <= orders.FASTCLIP_RTOL
    assert "| tiny (5 tensors" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        orders.main(["--orders", "2,-1"])


def test_orders_diagnostic_refuses_a_wrong_norm(monkeypatch):
    # Its correctness check can fail: a fastclip norm 1% off stops the run.
    import fastclip
    from fastclip.benchmark import orders

    real = fastclip.get_total_norm
    monkeypatch.setattr(fastclip, "get_total_norm", lambda grads, order: real(grads, order) * 1.01)
    with pytest.raises(RuntimeError, match="off the float64 reference"):
        orders.run(["tiny"], ["fp32"], [3.5], rounds=1)


def test_orders_diagnostic_does_not_time_a_wrong_torch_norm(monkeypatch):
    # Found in review: torch's norm was not checked, so a wrong one would
    # have been timed and published.
    from fastclip.benchmark import orders

    real = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda grads, order: real(grads, order) * 1.5)
    row = orders.run(["tiny"], ["fp32"], [3.5], rounds=1)["rows"][0]
    assert math.isnan(row["torch_ms"]) and math.isnan(row["speedup"]) and row["torch_rel_err"] > 0.4
    assert row["fastclip_ms"] > 0


def test_per_sample_diagnostic_times_both_methods(tmp_path, capsys):
    from fastclip.benchmark import per_sample

    assert per_sample.main(["--sets", "small", "--rounds", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "per_sample.json").read_text())
    (row,) = data["rows"]
    assert row["set"] == "small" and row["samples"] == 256 and row["tensors"] == 12
    for key in ("fastclip_norm_ms", "torch_norm_ms", "fastclip_clip_ms", "torch_clip_ms"):
        assert row[key] > 0
    assert "| small | 256 x 12 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        per_sample.main(["--sets", "small,huge"])
    # bf16: torch's norm comes back rounded to bf16 (found in review: the
    # check held it to float32's tolerance and the run always stopped).
    assert per_sample.run(["small"], torch.bfloat16, torch.device("cpu"), rounds=1)["dtype"] == "bfloat16"


@pytest.mark.parametrize("wrong", ["fastclip_norm", "fastclip_clip", "torch_clip"])
def test_per_sample_diagnostic_refuses_a_wrong_result(wrong, monkeypatch):
    """Its checks can fail: a norm 1e-5 off, or one sample's gradients
    clipped 1e-4 too far, stops the run before anything is timed."""
    import fastclip
    from fastclip.benchmark import per_sample

    module = torch.nn.utils if wrong.startswith("torch") else fastclip
    if wrong.endswith("norm"):
        real_norm = module.get_total_norm
        monkeypatch.setattr(module, "get_total_norm", lambda grads, **kw: real_norm(grads, **kw) * (1 + 1e-5))
    else:
        real_clip = module.clip_grad_norm_

        def clip(params, max_norm, **kw):
            out = real_clip(params, max_norm, **kw)
            params[0].grad.mul_(1 - 1e-4)
            return out
        monkeypatch.setattr(module, "clip_grad_norm_", clip)
    with pytest.raises(RuntimeError, match=wrong.split("_")[0] + ": "):
        per_sample.run(["small"], torch.float32, torch.device("cpu"), rounds=1)


def test_git_commit_is_fastclips_own(tmp_path, monkeypatch):
    """An installed fastclip inside another project's git repository reports
    no commit (found in review: that project's was reported as fastclip's)."""
    import subprocess

    repo = tmp_path / "project"
    package = repo / "venv" / "site-packages" / "fastclip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setattr(fastclip, "__file__", str(package / "__init__.py"))
    assert report._git_commit() is None
    (package.parent / "setup.py").write_text("")  # a setup.py beside it, but not the repository's top
    assert report._git_commit() is None
    monkeypatch.undo()
    checkout = __import__("pathlib").Path(fastclip.__file__).resolve().parents[1]
    if (checkout / ".git").exists():  # this suite runs from a checkout (CI's fresh clone)
        commit = report._git_commit()
        assert commit is not None and len(commit.split("-")[0]) == 40


def test_cuda_without_an_index_becomes_the_current_device(monkeypatch):
    # torch.cuda.set_device refuses a device without an index (found in
    # review: the default --device on a GPU machine was plain "cuda").
    monkeypatch.setattr(benchmark.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(benchmark.torch.cuda, "current_device", lambda: 3)
    parser = benchmark._parser()
    assert benchmark._device(parser, None) == benchmark.torch.device("cuda", 3)
    assert benchmark._device(parser, "cuda") == benchmark.torch.device("cuda", 3)
    assert benchmark._device(parser, "cuda:1") == benchmark.torch.device("cuda", 1)
    assert benchmark._device(parser, "cpu") == benchmark.torch.device("cpu")


def test_device_without_kernels_needs_allow_fallback(tmp_path, monkeypatch, capsys):
    # Its fastclip rows would time the plain-PyTorch fallback under
    # fastclip's name (a failed CUDA build, found in review).
    monkeypatch.setattr(fastclip._ops, "has_kernel", lambda device_type: False)
    with pytest.raises(SystemExit):
        benchmark.run([*TINY_RUN, "--cases", "norm"])
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error and "--allow-fallback" in error[-1] and "no cpu kernels" in error[-1], error
    rows, _ = benchmark.run([*TINY_RUN, "--cases", "norm", "--allow-fallback"])
    assert _row(rows, "norm", "fastclip").status == "ok"
    assert _row(rows, "norm", "fastclip op").status.startswith("unavailable")


def test_lists_done_are_written_when_a_later_one_fails(tmp_path, monkeypatch):
    # A device fault ends the run (the CUDA context is lost); the lists
    # timed before it are kept (found in review: all were lost).
    real = benchmark.Runner.run_list

    def run_list(self, set_name, dtype_name, case_names):
        if dtype_name == "bf16":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real(self, set_name, dtype_name, case_names)

    monkeypatch.setattr(benchmark.Runner, "run_list", run_list)
    with pytest.raises(RuntimeError, match="simulated"):
        benchmark.run([*TINY_RUN, "--cases", "norm", "--dtypes", "fp32,bf16", "--out", str(tmp_path)])
    with open(tmp_path / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert written and {r["dtype"] for r in written} == {"fp32"}
    assert json.loads((tmp_path / "results.json").read_text())["rows"]
