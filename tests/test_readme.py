"""The README tells the truth: its Python examples run and do what they say,
its op schemas are the registered ones, its design map names files that
exist, and its quick-start test command is the one CI runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastclip
from fastclip import _ops

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

pytestmark = pytest.mark.skipif(not README.exists(), reason="README.md is not next to the tests (installed elsewhere)")


def _blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language ('' for unlabelled),
    read fence by fence (a closing fence is not an opening one)."""
    blocks, current, label = [], None, None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, label = [], line[3:].strip()
            else:
                if label == language:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "README.md ends inside a code block"
    return blocks


def _block_containing(language: str, text: str) -> str:
    found = [b for b in _blocks(language) if text in b]
    assert len(found) == 1, f"expected one ```{language} block with {text!r} in README.md, found {len(found)}"
    return found[0]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _loss(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return (model(torch.randn(4, 7)) * 100.0).square().sum()  # norm well above max_norm=1


def _reference_norm(model: torch.nn.Module) -> float:
    """The gradients' fp64 2-norm for the same loss, on a copy of the model."""
    copy = _model()
    copy.load_state_dict(model.state_dict())
    _loss(copy).backward()
    return torch.cat([p.grad.double().flatten() for p in copy.parameters()]).norm().item()


def test_intro_example_clips_and_wraps():
    model = _model()
    expected = _reference_norm(model)
    loss = _loss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ns = {"torch": torch, "model": model, "loss": loss, "optimizer": optimizer}
    exec(compile(_block_containing("python", "was torch.nn.utils.clip_grad_norm_"), "README.md", "exec"), ns)
    assert expected > 10.0
    assert ns["total_norm"].item() == pytest.approx(expected, rel=1e-6)
    clipped = torch.cat([p.grad.double().flatten() for p in model.parameters()]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-5)  # lr=0: the step left the clipped grads alone
    assert isinstance(ns["optimizer"], fastclip.ClippedOptimizer)


def test_optimizer_wrapper_example_takes_a_clipped_step():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    ns = {"torch": torch, "fastclip": fastclip, "model": model, "loss": _loss(model)}
    exec(compile(_block_containing("python", "opt = fastclip.ClippedOptimizer(torch.optim.AdamW"), "README.md", "exec"), ns)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zero_grad ran
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert ns["opt"].last_norm.item() > 1.0  # the norm before the clip, kept by the wrapper


def test_vmap_example_clips_each_sample():
    torch.manual_seed(2)
    weights = torch.randn(6)
    batch = torch.randn(5, 6) * 50.0

    def loss(w, x):
        return (w * x).sum().square()

    ns = {"torch": torch, "fastclip": fastclip, "loss": loss, "weights": weights, "batch": batch}
    exec(compile(_block_containing("python", "torch.vmap(clip_one)"), "README.md", "exec"), ns)
    per_sample = ns["per_sample"].double()
    want = per_sample.norm(dim=1)
    torch.testing.assert_close(ns["norms"].double(), want, rtol=1e-6, atol=0)
    coef = (1.0 / (want + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(ns["clipped"].double(), per_sample * coef[:, None], rtol=1e-6, atol=1e-12)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_distributed_example_runs_on_a_single_process_group(tmp_path):
    """One gloo process: every group is the world, so each call must give the
    local norm (the multi-process behaviour is tests/test_distributed.py's)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        model = _model()
        expected = _reference_norm(model)
        _loss(model).backward()
        inner = torch.optim.SGD(model.parameters(), lr=0.0)
        ns = {"torch": torch, "fastclip": fastclip, "model": model, "my_params": list(model.parameters()),
              "pp_group": group, "tp_group": group, "dp_shard_group": group, "inner": inner}
        code = _block_containing("python", "process_group=pp_group")
        exec(compile(code, "README.md", "exec"), ns)
        assert isinstance(ns["opt"], fastclip.ClippedOptimizer)
        norms = [fastclip.get_total_norm([p.grad for p in model.parameters()]).item()]
        assert norms[0] == pytest.approx(1.0, rel=1e-5)  # clipped by the first line, then left at 1
        assert expected > 10.0
    finally:
        dist.destroy_process_group()


def test_op_schemas_are_the_registered_ones():
    if not _ops.available():
        pytest.skip("the extension is not built")
    block = _block_containing("", "torch.ops.fastclip.multi_tensor_norm(")
    # One schema per op: a line starting with torch.ops.fastclip., continued
    # on indented lines, up to its return type (comments dropped).
    documented = {}
    for entry in re.split(r"\n(?=torch\.ops\.fastclip\.)", block.strip()):
        text = " ".join(line.split("#")[0].strip() for line in entry.splitlines())
        text = re.sub(r"\s+", " ", text).strip()
        name = re.match(r"torch\.ops\.fastclip\.(\w+)\(", text).group(1)
        documented[name] = text.removeprefix("torch.ops.fastclip.")
    registered = {n.removeprefix("fastclip::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastclip::")}
    assert set(documented) == registered
    for name, text in documented.items():
        schema = str(getattr(torch.ops.fastclip, name).default._schema).removeprefix("fastclip::")
        assert text == schema, f"README:   {text}\nregistered: {schema}"


def test_design_map_names_files_that_exist():
    block = _block_containing("", "fastclip/clip.py")
    paths = [line.split()[0] for line in block.splitlines() if line.strip()]
    assert len(paths) >= 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README's design map names files that do not exist: {missing}"
    # and every C++/CUDA source and every module of the package is on the map
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in {".cpp", ".cu", ".h", ".cuh"}}
    sources |= {str(p.relative_to(ROOT)) for p in (ROOT / "fastclip").glob("*.py")}
    assert not sources - set(paths), f"source files missing from README's design map: {sorted(sources - set(paths))}"


def test_quick_start_test_command_is_the_one_ci_runs():
    quick_start = _block_containing("bash", "# 2. install and run the tests")
    lines = quick_start.splitlines()
    command = lines[lines.index("# 2. install and run the tests") + 1].strip()
    ci_run = ROOT / ".ci" / "run"
    if not ci_run.exists():
        pytest.skip(".ci/run is not in this tree (an sdist)")
    ci = ci_run.read_text()
    assert command + " || exit 1" in ci.splitlines()
