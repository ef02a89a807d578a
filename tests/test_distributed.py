"""Distributed clipping on gloo: the scenarios of dist_worker.py in 2 and 4
processes on this machine (time-bounded), plus the errors one process can see."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastclip

HERE = Path(__file__).parent
# A deadlocked collective fails the test instead of hanging CI; emulated or
# very slow machines may raise the limit (FASTCLIP_TEST_TIMEOUT_S).
TIMEOUT_S = int(os.environ.get("FASTCLIP_TEST_TIMEOUT_S", "300"))

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.mark.parametrize("world", [2, 4])
def test_scenarios(world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(HERE / "dist_worker.py"), str(world), str(tmp_path / "rendezvous")],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-6000:]}"
    import dist_worker

    for name in dist_worker.SCENARIOS:
        if name in dist_worker.UNAVAILABLE:  # shown in the test summary, not silently dropped
            assert f"skipped {name} on {world} processes" in done.stdout
            warnings.warn(f"scenario {name} not run: {dist_worker.UNAVAILABLE[name]}")
        else:
            assert f"passed {name} on {world} processes" in done.stdout


def _params():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 5.0)
    return [p]


@pytest.mark.parametrize(
    "call",
    [
        lambda group: fastclip.clip_grad_norm_(_params(), 1.0, process_group=group),
        lambda group: fastclip.get_total_norm([torch.ones(2)], process_group=group),
        lambda group: fastclip.grad_norms(_params(), process_group=group),
        lambda group: fastclip.ClippedOptimizer(torch.optim.SGD(_params(), lr=0.1), 1.0, process_group=group),
    ],
    ids=["clip_grad_norm_", "get_total_norm", "grad_norms", "ClippedOptimizer"],
)
def test_process_group_without_init(call):
    assert not torch.distributed.is_initialized()
    params = _params()
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastclip.clip_grad_norm_(params, 1.0, process_group=object())
    assert torch.equal(params[0].grad, torch.full((3,), 5.0))
    with pytest.raises(RuntimeError, match="not initialized"):
        call(object())


def test_empty_rank_device_follows_each_groups_backend_config(monkeypatch):
    """Where a rank without gradients puts its zero contribution: on a GPU
    when a group reduces CUDA tensors with NCCL, as the others' gradients
    are. A group made without a backend reports "undefined" from
    get_backend in torch 2.13, "cuda:nccl" from get_backend_config on a GPU
    machine (found in review: such a rank chose the CPU), and any group of
    the list may be the NCCL one."""
    from fastclip import _distributed

    class Group:
        def __init__(self, config, bound=None):
            self.config, self.bound_device_id = config, bound

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group: "undefined")
    monkeypatch.setattr(torch.distributed, "get_backend_config", lambda group: group.config)
    nccl, gloo = Group("cuda:nccl"), Group("cpu:gloo,cuda:gloo")
    assert _distributed._nccl_device((nccl,)) == -1  # the current device
    assert _distributed._nccl_device((gloo, Group("cpu:gloo,cuda:nccl", torch.device("cuda", 3)))) == 3
    assert _distributed._nccl_device((gloo, nccl)) == -1
    assert _distributed._nccl_device((gloo, Group("cpu:gloo"))) is None
    assert _distributed.collective_device([gloo]) == torch.device("cpu")


def test_no_process_group_is_local():
    params = _params()
    assert float(fastclip.clip_grad_norm_(params, 1.0, process_group=None)) == pytest.approx(75 ** 0.5)


@pytest.mark.parametrize("layout", ["shard", "sequence-parallel"])
def test_distributed_benchmark_runs_and_checks(tmp_path, layout):
    """The 2-process benchmark on the tiny list, in a fresh interpreter as a
    user runs it: every method timed, the norm and the clipped shards
    checked before timing; with Partial(sum) 1-D gradients too."""
    done = subprocess.run(
        [sys.executable, "-m", "fastclip.benchmark.distributed", "--sets", "tiny", "--repeats", "1", "--warmup", "0",
         "--layout", layout, "--out", str(tmp_path)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-6000:]}"
    import json

    from fastclip.benchmark import distributed

    rows = json.loads((tmp_path / "distributed.json").read_text())["rows"]
    assert [r["set"] for r in rows] == ["tiny"] and rows[0]["layout"] == layout
    assert (rows[0]["partial_tensors"] > 0) == (layout == "sequence-parallel")
    for method in distributed.METHODS:
        assert rows[0][f"{method}_median_ms"] > 0
    assert rows[0]["norm_rel_err_fastclip"] <= 1e-6


def test_partial_placements_fastclip_can_scale():
    """Which pending reductions a clip may scale part by part (the others
    are refused with the element's name, before any collective): sum and
    avg together (they commute), max or min alone; not a product, a
    Partial subclass (torch's norm and mask placements reduce otherwise),
    nor a sum next to a maximum (their order would matter; torch 2.13's
    DTensor refuses to make one, earlier versions did not)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    from fastclip import _distributed

    shards, replicate, _ = _distributed._placement_types()
    key = lambda *placements: _distributed._placement_key(placements, shards, replicate, "grads[3]")
    assert key(Shard(0), Partial("avg"), Partial("sum")) == ((0,), ((1, "avg"), (2, "sum")))
    assert key(Partial("max"), Replicate(), Partial("max")) == ((), ((0, "max"), (2, "max")))
    assert key(Replicate(), Shard(1)) == ((1,), ())

    class Custom(Partial):
        pass

    for placements, match in (
        ((Partial("sum"), Partial("max")), "depends on their order"),
        ((Partial("min"), Partial("max")), "depends on their order"),
        ((Partial("avg"), Partial("min")), "depends on their order"),
        ((Shard(0), Partial("product")), "does not know"),
        ((Custom("sum"),), "does not know"),
    ):
        with pytest.raises(ValueError, match=match) as error:
            key(*placements)
        assert "grads[3]" in str(error.value)
