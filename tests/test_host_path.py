"""The host side of a call: how the Python API reaches the ops, and what the
ops do for autograd.

- The fast path gathers gradients in C++ (``_C.HeldTensors``) and calls the
  ops from there; a ``__torch_function__`` mode or torch.compile take the
  ``torch.ops`` path instead. Both must give the same bits.
- The ops have Autograd kernels of their own: in-place ops refuse tensors
  that require grad while grad mode is on (nothing modified), and bump the
  version counters of what they may have written, so that autograd catches
  a saved tensor modified by a clip.
- In-place ops refuse views whose elements share memory, and inference
  tensors outside InferenceMode (as torch does, but before writing).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastclip
from fastclip import _ops
from testing import (
    DEVICE_PARAMS,
    assert_identical,
    assert_norm_close,
    assert_same_bits,
    assert_scaled_close,
    assert_untouched,
    clone_params,
    make_grads,
    make_params,
    ref_coef,
    ref_norm,
    ref_norms_each,
    require_kernel,
    snapshot,
)

ops = torch.ops.fastclip
SHAPES = [(7,), (3, 5), (), (0,), (64, 33), (1000,)]

# Each in-place op, called so that it writes every tensor of a list.
in_place_param = pytest.mark.parametrize(
    "call",
    [
        lambda ts: ops.clip_(ts, 0.5, 2.0),
        lambda ts: ops.multi_tensor_scale_(ts, torch.tensor(0.5)),
        lambda ts: ops.multi_tensor_clamp_(ts, 0.1),
    ],
    ids=["clip_", "multi_tensor_scale_", "multi_tensor_clamp_"],
)


class _RecordOps(TorchFunctionMode):
    """Records the torch.ops.fastclip overloads called under it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if "fastclip" in str(getattr(func, "namespace", "")) or "fastclip" in str(func):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _params(device, dtype=torch.float32, seed=0, scale=3.0):
    return make_params(make_grads(SHAPES, dtype, device, seed=seed, scale=scale))


# ------------------------------------------------- fast path vs torch.ops
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_held_path_equals_torch_ops_path(device, dtype, monkeypatch):
    require_kernel(device)
    fast = _params(device, dtype)
    slow = clone_params(fast)
    mode = _RecordOps()
    # The first run must really take the C++ holder: record what hold() gives.
    holders = []
    real_hold = _ops.hold

    def spy(*args, **kwargs):
        held = real_hold(*args, **kwargs)
        holders.append(held is not None and held.one_call)
        return held

    monkeypatch.setattr(_ops, "hold", spy)
    # Every public function, once through the C++ holder and once through torch.ops.
    results_fast = [
        fastclip.get_total_norm([p.grad for p in fast], 3.5),
        *fastclip.grad_norms(fast, 1.0),
        fastclip.clip_grad_norm_(fast, 0.25),
    ]
    fastclip.clip_grads_with_norm_(fast, 1.0, torch.tensor(4.0))
    fastclip.clip_grad_value_(fast, 0.01)
    assert len(holders) == 5 and all(holders), holders
    with mode:
        results_slow = [
            fastclip.get_total_norm([p.grad for p in slow], 3.5),
            *fastclip.grad_norms(slow, 1.0),
            fastclip.clip_grad_norm_(slow, 0.25),
        ]
        fastclip.clip_grads_with_norm_(slow, 1.0, torch.tensor(4.0))
        fastclip.clip_grad_value_(slow, 0.01)
    # The mode saw the ops: the second run really took the torch.ops path.
    assert {"multi_tensor_norm", "clip_", "multi_tensor_scale_", "multi_tensor_clamp_"} <= {
        s.split(".")[0] for s in mode.seen
    }, mode.seen
    for a, b in zip(results_fast, results_slow):
        assert_identical(a, b)
    for p, q in zip(fast, slow):
        if p.grad is not None:
            assert_identical(p.grad, q.grad)


def test_device_context_keeps_the_held_path(monkeypatch):
    # `with torch.device(...)` is a __torch_function__ mode that changes
    # factory functions only: the calls still go through the C++ holder,
    # and a refused gradient is named as the caller counts (found in
    # review: under it the torch.ops path named the op's tensors[1]).
    holders = []
    real_hold = _ops.hold
    monkeypatch.setattr(_ops, "hold", lambda *a: holders.append(1) or real_hold(*a))
    params = make_params([None, torch.ones(2), torch.ones(3)])
    params[2].grad = torch.ones(1).expand(3)
    with torch.device("cpu"):
        for call in (lambda: fastclip.clip_grad_value_(params, 1.0), lambda: fastclip.clip_grad_norm_(params, 1.0)):
            with pytest.raises(RuntimeError, match=r"parameters\[2\]\.grad has elements that share memory"):
                call()
        assert holders == [1, 1]
        with _RecordOps() as mode:  # any other mode still sees the ops
            fastclip.get_total_norm([params[1].grad], 2.0)
        assert holders == [1, 1] and mode.seen, mode.seen


@pytest.mark.filterwarnings("ignore:fastclip. computing with plain PyTorch")
@pytest.mark.parametrize("default", ["meta", "cpu"])
def test_device_context_changes_no_result(default):
    """fastclip's own tensors (an index, a coefficient, a number given as
    total_norm) are made where it uses them, whatever `with torch.device`
    says (found in review: under a meta default the split path failed with
    "Cannot copy out of meta tensor", blamed on a gradient's dtype)."""
    def grads():
        return [torch.tensor([3.0, 4.0]), torch.tensor([1j], dtype=torch.complex64), torch.tensor([2.0])]

    calls = {
        "clip_grad_norm_": lambda ps: fastclip.clip_grad_norm_(ps, 1.0),
        "clip_grads_with_norm_": lambda ps: fastclip.clip_grads_with_norm_(ps, 1.0, 10.0),
        "grad_norms": lambda ps: fastclip.grad_norms(ps),
        "get_total_norm": lambda ps: fastclip.get_total_norm([p.grad for p in ps]),
        "clip_grad_value_": lambda ps: fastclip.clip_grad_value_(ps[:1] + ps[2:], 3.5),
    }
    for name, call in calls.items():
        expected_params, params = make_params(grads()), make_params(grads())
        expected = call(expected_params)
        with torch.device(default):
            result = call(params)
        for a, b in zip(expected if isinstance(expected, tuple) else [expected],
                        result if isinstance(result, tuple) else [result]):
            if a is not None:
                assert_identical(a, b)
        for p, q in zip(expected_params, params):
            assert_identical(p.grad, q.grad)

def test_held_tensors_reports_what_blocks_one_call():
    dense = make_params(make_grads([(3,), (4,)]))
    assert _ops.hold(dense, True, "parameters").one_call
    assert _ops.hold(dense, True, "parameters").blocker is None
    assert len(_ops.hold(dense + [torch.nn.Parameter(torch.zeros(2))], True, "parameters")) == 2  # None skipped
    sparse = torch.nn.Parameter(torch.zeros(3))
    sparse.grad = torch.zeros(3).to_sparse()
    held = _ops.hold(dense + [sparse], True, "parameters")
    assert not held.one_call and held.blocker == "sparse"
    assert [t.layout for t in held.tensors()] == [torch.strided, torch.strided, torch.sparse_coo]
    empty = _ops.hold([], True, "parameters")
    assert len(empty) == 0 and not empty.one_call
    with pytest.raises(RuntimeError, match="cannot go to one op call"):
        empty.clip_(1.0, 2.0, False)
    with pytest.raises(TypeError, match=r"parameters\[1\] is a str"):
        _ops.hold([dense[0], "x"], True, "parameters")
    with pytest.raises(TypeError, match=r"tensors\[0\] is a int"):
        _ops.hold([3], False, "tensors")


def test_held_tensors_asks_subclasses_for_grad():
    class Scaled(torch.Tensor):
        """A subclass whose .grad is computed in Python."""

        @property
        def grad(self):
            return torch.full((2,), 3.0)

    t = torch.zeros(2).as_subclass(Scaled)
    held = _ops.hold([t], True, "parameters")
    assert len(held) == 1
    assert_norm_close(held.norm(2.0, False)[0], torch.tensor(math.sqrt(18.0), dtype=torch.float64))


def test_held_tensors_see_a_grad_property_added_later():
    """The per-type decision is made again when the class changes (found in
    review: a property added after the first call was not read, and the
    gradient it gives was not clipped)."""
    class Late(torch.nn.Parameter):
        pass

    p = Late(torch.zeros(2))
    p.grad = torch.zeros(2)
    assert float(_ops.hold([p], True, "parameters").norm(2.0, False)[0]) == 0.0  # read in C++, decided
    Late.grad = property(lambda self: torch.full((2,), 3.0))
    assert_norm_close(_ops.hold([p], True, "parameters").norm(2.0, False)[0], torch.tensor(math.sqrt(18.0), dtype=torch.float64))
    total = fastclip.clip_grad_norm_([p], 1.0)
    assert_norm_close(total, torch.tensor(math.sqrt(18.0), dtype=torch.float64))
    del Late.grad  # back to torch's descriptor: read in C++ again
    assert float(_ops.hold([p], True, "parameters").norm(2.0, False)[0]) == 0.0


def test_held_tensors_ask_python_where_getattribute_is_overridden():
    """A Parameter subclass whose __getattribute__ answers .grad (found in
    review: read in C++, its gradient [3, 4] was taken as the stored zeros,
    and torch.ops' path under a __torch_function__ mode gave 5)."""
    class Redirected(torch.nn.Parameter):
        def __getattribute__(self, name):
            if name == "grad":
                return object.__getattribute__(self, "shadow")
            return super().__getattribute__(name)

    p = Redirected(torch.zeros(2))
    p.grad = torch.zeros(2)  # what C++ would read
    p.shadow = torch.tensor([3.0, 4.0])
    assert float(fastclip.clip_grad_norm_([p], 1.0)) == 5.0
    torch.testing.assert_close(p.shadow, torch.tensor([0.6, 0.8]))


def test_held_tensors_read_a_grad_descriptor_only_through_instances():
    """A `grad` descriptor that refuses access through the class (found in
    review: the type check read it from the class and raised AttributeError,
    also for get_total_norm, which never reads .grad)."""
    class InstanceOnly:
        def __get__(self, obj, cls=None):
            if obj is None:
                raise AttributeError("grad is an instance attribute")
            return obj.stored

        def __set__(self, obj, value):
            obj.stored = value

    class P(torch.nn.Parameter):
        grad = InstanceOnly()

    class T(torch.Tensor):
        grad = InstanceOnly()
        __torch_function__ = torch._C._disabled_torch_function_impl

    p = P(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert float(fastclip.clip_grad_norm_([p], 1.0)) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))
    assert float(fastclip.get_total_norm([torch.tensor([3.0, 4.0]).as_subclass(T)])) == 5.0


def test_held_tensors_keep_no_tensor_class_alive():
    """Classes made at run time are freed once unused (found in review: the
    per-type cache kept a reference to each, and all their class bodies
    held, for the life of the process)."""
    import gc
    import weakref

    def make_class():
        class Temporary(torch.nn.Parameter):
            payload = torch.zeros(1000)
        return Temporary

    refs = []
    for _ in range(5):
        cls = make_class()
        p = cls(torch.zeros(2))
        p.grad = torch.ones(2)
        fastclip.clip_grad_norm_([p], 1.0)
        refs.append(weakref.ref(cls))
        del cls, p
    gc.collect()
    assert [r() for r in refs] == [None] * 5


def test_held_tensors_see_a_class_changed_by_a_grad_getter_mid_call():
    """A Python .grad getter that adds a grad property to the class of later
    items of the same call (found in review: the call kept reading that
    class's gradients in C++)."""
    class Plain(torch.nn.Parameter):
        pass

    class Trigger(torch.nn.Parameter):
        @property
        def grad(self):
            Plain.grad = property(lambda self: torch.tensor([3.0, 4.0]))
            return None

    first, second = Plain(torch.zeros(2)), Plain(torch.zeros(2))
    first.grad = second.grad = torch.zeros(2)
    try:
        held = _ops.hold([first, Trigger(torch.zeros(2)), second], True, "parameters")
        assert_norm_close(held.norm(2.0, False)[0], torch.tensor(5.0, dtype=torch.float64))
    finally:
        del Plain.grad


def test_held_tensors_let_torch_function_see_grad():
    # A subclass with a __torch_function__ of its own may answer .grad itself:
    # its gradients are asked for in Python, not read in C++.
    class Redirect(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if getattr(func, "__self__", None) is torch.Tensor.grad and func.__name__ == "__get__":
                return torch.full((2,), 4.0)
            return super().__torch_function__(func, types, args, kwargs or {})

    t = torch.zeros(2).as_subclass(Redirect)
    t.grad = torch.zeros(2)  # what C++ would read
    assert_norm_close(_ops.hold([t], True, "parameters").norm(2.0, False)[0], torch.tensor(math.sqrt(32.0), dtype=torch.float64))


def test_torch_function_subclasses_in_a_tensor_list_see_the_ops():
    """A list of tensors (get_total_norm's) holding a subclass with its own
    __torch_function__ goes through torch.ops, which calls it (found in
    review: an UninitializedParameter's norm was taken as that of its empty
    data, where torch raises)."""
    class Log(torch.Tensor):
        seen: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(getattr(func, "__name__", ""))
            return super().__torch_function__(func, types, args, kwargs or {})

    plain = torch.ones(3)
    held = _ops.hold([plain, torch.tensor([3.0, 4.0]).as_subclass(Log)], False, "tensors")
    assert not held.one_call and held.blocker == "torch_function subclass"
    assert _ops.hold([plain, torch.nn.Parameter(torch.ones(2))], False, "tensors").one_call  # Parameter is plain
    Log.seen.clear()
    total = fastclip.get_total_norm([plain, torch.tensor([3.0, 4.0]).as_subclass(Log)])
    assert "multi_tensor_norm.default" in Log.seen, Log.seen
    assert float(total) == pytest.approx(math.sqrt(28.0), rel=1e-7)
    lazy = [torch.nn.parameter.UninitializedParameter(), torch.tensor([3.0, 4.0])]
    for get_total_norm in (torch.nn.utils.get_total_norm, fastclip.get_total_norm):
        with pytest.raises(ValueError, match="uninitialized parameter"):
            get_total_norm(lazy)


def test_held_tensors_keep_gradients_alive():
    # The holder owns its tensors: dropping the parameters' grads in between
    # (as zero_grad does) must not leave it with freed memory.
    params = make_params(make_grads([(100,), (33,)], seed=3))
    expected = ref_norm([p.grad for p in params])
    held = _ops.hold(params, True, "parameters")
    for p in params:
        p.grad = None
    assert_norm_close(held.norm(2.0, False)[0], expected)


# ------------------------------------------------------- autograd kernels
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@in_place_param
def test_in_place_ops_refuse_tensors_that_require_grad(call, device):
    require_kernel(device)
    tensors = make_grads([(5,), (3, 4)], torch.float32, device, seed=4, scale=3.0)
    tensors[1].requires_grad_(True)
    before = snapshot(tensors)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] requires grad.*torch.no_grad"):
        call(tensors)
    assert_untouched(tensors, before)
    with torch.no_grad():  # the Python API's own setting: allowed
        call(tensors)
    assert not torch.equal(tensors[0], before[0][0])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_norm_of_tensors_that_require_grad_is_not_differentiable(device):
    require_kernel(device)
    tensors = make_grads([(5,), (3, 4)], torch.float32, device, seed=5)
    for t in tensors:
        t.requires_grad_(True)
    total, each = ops.multi_tensor_norm(tensors, 2.0, True)
    # Not silently a constant: a backward through it raises (see
    # test_ops.test_outputs_from_inputs_that_require_grad_refuse_backward).
    with pytest.raises(RuntimeError, match="derivative for fastclip::multi_tensor_norm is not implemented"):
        (total + each.sum()).backward()
    assert_norm_close(total.detach(), ref_norm([t.detach() for t in tensors]))
    with torch.no_grad():
        assert not ops.multi_tensor_norm(tensors, 2.0, True)[0].requires_grad


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_written_tensors_get_new_versions(device):
    require_kernel(device)
    tensors = make_grads([(5,), (3, 4), (0,)], torch.float32, device, seed=6, scale=3.0)
    versions = [t._version for t in tensors]
    ops.clip_(tensors, 0.5, 2.0)  # clips: writes every tensor
    assert all(t._version > v for t, v in zip(tensors, versions))
    versions = [t._version for t in tensors]
    ops.multi_tensor_scale_(tensors, torch.tensor(0.5))
    assert all(t._version > v for t, v in zip(tensors, versions))
    versions = [t._version for t in tensors]
    ops.multi_tensor_clamp_(tensors, 0.01)
    assert all(t._version > v for t, v in zip(tensors, versions))


def test_cpu_coefficient_one_keeps_versions():
    # The CPU knows it wrote nothing (a GPU decides on the device, so its
    # glue bumps whenever a writing kernel was launched).
    tensors = make_grads([(5,), (3, 4)], torch.float32, "cpu", seed=7)
    before = snapshot(tensors)
    ops.clip_(tensors, 1e9, 2.0)
    ops.multi_tensor_scale_(tensors, torch.tensor(1.0))
    ops.multi_tensor_clamp_(tensors, math.inf)
    assert_untouched(tensors, before)  # values and versions


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_autograd_catches_a_saved_gradient_clipped_in_place(device):
    require_kernel(device)
    weight = torch.ones(5, device=device, requires_grad=True)
    param = torch.nn.Parameter(torch.zeros(5, device=device))
    param.grad = torch.full((5,), 10.0, device=device)
    loss = (weight * param.grad).sum()  # saves param.grad for weight's gradient
    fastclip.clip_grad_norm_([param], 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Negative control: without the clip, backward runs.
    param.grad = torch.full((5,), 10.0, device=device)
    (weight * param.grad).sum().backward()
    assert torch.equal(weight.grad, param.grad)


# ------------------------------------------------- views that share memory
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@in_place_param
def test_in_place_ops_refuse_self_overlapping_views(call, device):
    require_kernel(device)
    dense = make_grads([(6,), (4, 4)], torch.float32, device, seed=8, scale=3.0)
    expanded = torch.full((1,), 7.0, device=device).expand(3)
    tensors = [dense[0], expanded, dense[1]]
    before = snapshot(tensors)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has elements that share memory"):
        call(tensors)
    assert_untouched(tensors, before)  # the dense tensors before it too


# ------------------------------------------- entries that share memory
def _shared_lists():
    """Lists whose entries share bytes (dense, and views with gaps), each
    built on a device, with the values torch's loop over the tensors (one
    in-place multiply after the other) leaves."""
    out = []
    t = torch.linspace(-3.0, 3.0, 70_000)
    out.append(("same tensor twice", lambda x: [x, x]))
    out.append(("a view and its base", lambda x: [x, x.view(100, 700)]))
    out.append(("overlapping slices", lambda x: [x[:50_000], x[20_000:]]))
    out.append(("shared among others",
                lambda x: [torch.ones(40_000, device=x.device), x[10:], torch.ones(9, device=x.device), x.view(7, 10_000)]))
    out.append(("overlapping views with gaps", lambda x: [x[:60_000:2], x[10_000::3], x[:60_000:2]]))
    return [(name, lambda device, make=make: make(t.to(device))) for name, make in out]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("name,build", _shared_lists(), ids=[n for n, _ in _shared_lists()])
def test_entries_sharing_memory_are_written_in_list_order(name, build, device):
    # With several threads (a GPU: several blocks of one launch) the
    # entries' chunks would otherwise be written at the same time: some
    # elements scaled once, others twice, run to run.
    require_kernel(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(20):
            tensors, expected = build(device), build(device)
            coef = torch.tensor(0.5, dtype=torch.float64)
            ops.multi_tensor_scale_(tensors, coef)
            for e in expected:  # torch's loop: one entry after the other
                e.mul_(coef)
            for t, e in zip(tensors, expected):
                assert_identical(t, e)

            tensors, expected = build(device), build(device)
            norm = ref_norm(expected)  # every entry counted, as torch counts it
            ops.clip_(tensors, 1.0, 2.0)
            for e in expected:
                e.mul_(ref_coef(1.0, norm))
            for t, e in zip(tensors, expected):
                assert_scaled_close(t, e)
    finally:
        torch.set_num_threads(threads)


def test_two_storages_over_one_allocation_are_written_in_list_order():
    """torch.from_numpy of one array twice: two storages, one allocation.
    Found in review: both were scaled by two threads at once, and a run
    lost some of the second scale (140-1,598 of 2,000 calls on 2 cores);
    the check keys entries by their allocation now. (Without it a run of
    this test fails by chance: 500 calls.)"""
    numpy = pytest.importorskip("numpy")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(500):
            memory = numpy.ones(1 << 16, dtype=numpy.float32)
            first, second = torch.from_numpy(memory), torch.from_numpy(memory)
            assert first.untyped_storage()._cdata != second.untyped_storage()._cdata  # two storages
            ops.multi_tensor_scale_([first, second], torch.tensor(0.5))
            assert bool((first == 0.25).all())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["two_foreign", "foreign_over_torch"])
def test_storages_over_overlapping_memory_at_different_starts_are_written_in_list_order(kind):
    """Two storages over overlapping memory that start at different
    addresses: torch.frombuffer of one buffer at two offsets (as
    torch.from_numpy of two overlapping slices), or a DLPack view of a torch
    tensor's tail. Found in review: keyed by their starts they looked
    unrelated, two threads scaled the shared bytes at once, and 130-280 of
    500 calls lost one of the two scales. (Without the check a run of this
    test fails by chance: 300 calls.)"""
    n, shift = 1 << 16, 8
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(300):
            if kind == "two_foreign":
                memory = bytearray(4 * (n + shift))
                whole = torch.frombuffer(memory, dtype=torch.float32)
                whole.fill_(1.0)
                first = torch.frombuffer(memory, dtype=torch.float32, count=n)
                second = torch.frombuffer(memory, dtype=torch.float32, offset=4 * shift, count=n)
            else:
                whole = torch.ones(n + shift)
                first = whole[:n]
                second = torch.from_dlpack(whole[shift:])
            assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
            ops.multi_tensor_scale_([first, second], torch.tensor(0.5))
            assert bool((whole[shift:n] == 0.25).all()) and bool((whole[:shift] == 0.5).all())
            assert bool((whole[n:] == 0.5).all())
    finally:
        torch.set_num_threads(threads)


# How the CPU kernels split a list among threads (multi_tensor_cpu.cpp).
_PIECES_PER_THREAD = 32


def test_pieces_per_thread_matches_the_kernels():
    source = Path(__file__).resolve().parent.parent / "csrc" / "cpu" / "multi_tensor_cpu.cpp"
    if not source.exists():
        pytest.skip("run from an installed package without its sources")
    assert f"constexpr int64_t kPiecesPerThread = {_PIECES_PER_THREAD};" in source.read_text()


def _pieces_that_race():
    """A list where two threads would write shared bytes out of list order:
    a float32 tensor `w` ends one piece of the list (after a long tensor
    `z`), and a bfloat16 view of its bytes starts the next piece (followed
    by a long tensor `v`). The two pieces go to the two threads at about
    the same time, and the view, short, is written before the other thread
    gets past `z`. Returns `z`, the bytes of `w` as bfloat16 pairs, `v` and
    the thread count."""
    threads = 2
    pieces = threads * _PIECES_PER_THREAD
    piece = 1 << 18  # elements: the list's total over `pieces`
    w_elems = 1 << 13
    z = torch.empty(pieces // 2 * piece - w_elems)
    v = torch.empty(pieces // 2 * piece - 2 * w_elems)
    # Pairs of normal bfloat16 values seen as float32: every value, as
    # either dtype, stays finite and normal when scaled.
    gen = torch.Generator().manual_seed(23)
    halves = (torch.rand(2 * w_elems, generator=gen) + 0.5).to(torch.bfloat16)
    assert z.numel() + w_elems + halves.numel() + v.numel() == pieces * piece
    return z, halves, v, threads


def test_entries_sharing_memory_across_pieces_are_written_in_list_order():
    # Unlike the lists above, this one has two threads write shared bytes
    # out of list order whenever the two pieces go to different threads at
    # about the same time (100 of 100 calls on 2 cores, if not written in
    # order; one thread taking both would keep the order, hence 10 calls).
    # Scaling by 0.3 rounds, so the two orders give different bits.
    z, halves, v, threads = _pieces_that_race()
    coef = torch.tensor(0.3, dtype=torch.float64)

    def scaled(order):
        h = halves.clone()
        for view in order(h):
            view.mul_(coef)
        return h

    in_order = scaled(lambda h: [h.view(torch.float32), h])
    assert not torch.equal(in_order, scaled(lambda h: [h, h.view(torch.float32)]))
    one_scaled = torch.full((), 1.0).mul_(coef)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(10):
            z.fill_(1.0)
            v.fill_(1.0)
            h = halves.clone()
            ops.multi_tensor_scale_([z, h.view(torch.float32), h, v], coef)
            assert_identical(h, in_order)
            assert bool((z == one_scaled).all()) and bool((v == one_scaled).all())
    finally:
        torch.set_num_threads(saved)

@pytest.mark.skipif(sys.byteorder != "little", reason="the values below assume little-endian floats")
@pytest.mark.parametrize("storages", ["one", "two"])
@pytest.mark.parametrize("op", ["scale", "clip", "clamp"])
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_view_with_gaps_over_an_entry_in_another_dtype_is_written_in_list_order(device, op, storages):
    """Views with gaps are written after the other entries; where one's
    bytes reach another entry's, the list is written entry by entry in list
    order (found in review: a bfloat16 view with gaps of a float32 tensor
    listed first was scaled after it). Only two dtypes over the same bytes
    tell the orders apart. Found by address, so also over two storages of
    the same memory (torch.frombuffer twice: host memory, so on the CPU
    only). On a GPU through the glue's in-order path (not yet run on one)."""
    require_kernel(device)
    if storages == "two" and device != "cpu":
        pytest.skip("torch.frombuffer makes CPU tensors")

    def build():
        # Pairs of normal bfloat16 values as float32 (little-endian: the odd
        # halves are the floats' upper halves, normal bfloat16 values when
        # scaled or clamped either way; torch's NaN bits would differ). The
        # lower halves are below 2^-24, so that a float whose upper half was
        # clamped to bfloat16(0.7) < 0.7 stays below 0.7: the clamp's orders differ.
        rand = torch.rand(2, 4001, generator=torch.Generator().manual_seed(29))
        halves = torch.stack([rand[0] * 2e-8 + 1e-9, rand[1] + 0.5], dim=1).flatten().to(torch.bfloat16)
        halves = halves.to(device)  # both views below over the same device memory
        words = halves.view(torch.float32)
        if storages == "two":
            memory = bytearray(halves.view(torch.int16).numpy().tobytes())
            halves, words = torch.frombuffer(memory, dtype=torch.bfloat16), torch.frombuffer(memory, dtype=torch.float32)
            assert halves.untyped_storage().data_ptr() == words.untyped_storage().data_ptr()
        return [torch.ones(3, device=device), halves[1::2], words, torch.ones(5, device=device)]

    tensors, expected = build(), build()
    coef = torch.tensor(0.3, dtype=torch.float64)
    if op == "scale":
        ops.multi_tensor_scale_(tensors, coef)
        for e in expected:
            e.mul_(coef)
    elif op == "clip":
        norm = ref_norm(expected)
        ops.clip_(tensors, 1.0, 2.0)
        for e in expected:
            e.mul_(ref_coef(1.0, norm))
    else:
        ops.multi_tensor_clamp_(tensors, 0.7)
        for e in expected:
            e.clamp_(-0.7, 0.7)
    assert_identical(tensors[2], expected[2])
    # Negative control: gaps last is another result.
    other = build()
    for e in (other[0], other[2], other[1], other[3]):
        if op == "clamp":
            e.clamp_(-0.7, 0.7)
        else:
            e.mul_(coef if op == "scale" else ref_coef(1.0, ref_norm(build())))
    assert not torch.equal(other[2], expected[2])


def test_tensor_whose_storage_was_freed_is_refused_before_writing():
    # FSDP frees a parameter's memory with untyped_storage().resize_(0); a
    # tensor over it, or a view at an offset into it, then has elements
    # beyond its storage (torch's own norm of it crashes).
    freed = torch.ones(5)
    freed.untyped_storage().resize_(0)
    flat = torch.ones(1000)
    offset_view, gapped_view = flat[500:], flat[100:300:2]
    flat.untyped_storage().resize_(100)  # 25 floats left
    dense = make_grads([(6,)], seed=14, scale=3.0)
    before = snapshot(dense)
    for bad in (freed, offset_view, gapped_view):
        for call in (lambda ts: ops.multi_tensor_norm(ts, 2.0, False), lambda ts: ops.clip_(ts, 0.1, 2.0)):
            with pytest.raises(RuntimeError, match=r"tensors\[1\] has elements beyond the memory of its storage"):
                call(dense + [bad])
    assert_untouched(dense, before)


# ------------------------------------------------------ inference tensors
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@in_place_param
def test_in_place_ops_refuse_inference_tensors_outside_inference_mode(call, device):
    require_kernel(device)
    dense = make_grads([(6,), (4, 4)], torch.float32, device, seed=10, scale=3.0)
    with torch.inference_mode():
        frozen = torch.full((5,), 7.0, device=device)
    tensors = [dense[0], frozen, dense[1]]
    before = snapshot(dense)  # an inference tensor has no version counter to snapshot
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is an inference tensor"):
        call(tensors)
    assert_untouched(dense, before)  # the tensor before it too
    assert torch.equal(frozen, torch.full((5,), 7.0, device=device))
    with torch.inference_mode():  # allowed in InferenceMode, as in torch
        call(tensors)
    assert not torch.equal(frozen, torch.full((5,), 7.0, device=device))


def test_clip_grad_norm_refuses_inference_gradient_and_reads_it():
    params = make_params(make_grads([(6,), (3,)], seed=11, scale=3.0))
    with torch.inference_mode():
        params[1].grad = torch.full((3,), 7.0)
    before = snapshot([params[0].grad])
    with pytest.raises(RuntimeError, match="inference tensor"):
        fastclip.clip_grad_norm_(params, 0.1)
    with pytest.raises(RuntimeError, match="inference tensor"):
        fastclip.clip_grad_value_(params, 0.1)
    assert_untouched([params[0].grad], before)
    assert torch.equal(params[1].grad, torch.full((3,), 7.0))
    # Reading is fine, as in torch.
    assert_norm_close(fastclip.get_total_norm([p.grad for p in params]), ref_norm([p.grad for p in params]))


def test_clip_grad_norm_refuses_self_overlapping_gradient():
    params = make_params(make_grads([(6,), (3,)], seed=9, scale=3.0))
    params[1].grad = torch.full((1,), 7.0).expand(3)
    before = snapshot([p.grad for p in params])
    with pytest.raises(RuntimeError, match="share memory"):
        fastclip.clip_grad_norm_(params, 0.1)
    assert_untouched([p.grad for p in params], before)
    # Reading them is fine: the norm counts the repeated element three times.
    assert_norm_close(fastclip.get_total_norm([p.grad for p in params]), ref_norm([p.grad for p in params]))


def _clip_in_child(queue):
    # Small tensors, together past the kernels' parallel threshold, and
    # enough of them for the table's and the version bumps' parallel walks.
    grads = [torch.full((50,), 0.5) for _ in range(2000)]
    params = [torch.nn.Parameter(torch.zeros(50)) for _ in grads]
    for p, g in zip(params, grads):
        p.grad = g
    queue.put(float(fastclip.clip_grad_norm_(params, 1.0)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_forked_child_does_not_hang_after_the_parent_used_threads():
    """GNU OpenMP's threads do not survive fork(): a parallel region in the
    child waited forever once the parent had used them (found in review;
    torch's clip of the same small tensors, which it runs serially, did not
    hang). A forked child runs the kernels on its own thread."""
    import multiprocessing

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        big = [torch.ones(1 << 20), torch.ones(1 << 20)]
        fastclip.get_total_norm(big)  # the parent's OpenMP threads now exist
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_clip_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        hung = child.is_alive()
        if hung:
            child.kill()
            child.join()
        assert not hung, "the forked child's clip did not finish in 60 s"
        assert child.exitcode == 0
        assert queue.get(timeout=5) == pytest.approx(math.sqrt(2000 * 50 * 0.25), rel=1e-6)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------- long lists: parallel walks
# Lists of at least this many tensors have their checks, table and version
# bumps walked on ATen's threads (ops.cpp); a tensor the walk does not take
# sends the list to the one-thread checks and walk, which raise in list order.
_PARALLEL_WALK_TENSORS = 1024
_LONG = 3 * _PARALLEL_WALK_TENSORS


def test_parallel_walk_threshold_matches_the_ops():
    source = Path(__file__).resolve().parent.parent / "csrc" / "ops.cpp"
    if not source.exists():
        pytest.skip("run from an installed package without its sources")
    assert f"constexpr int64_t kParallelWalkTensors = {_PARALLEL_WALK_TENSORS};" in source.read_text()


def _long_list(seed):
    """_LONG small float32 tensors (0-size ones among them)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(0 if i % 401 == 7 else 1 + i % 37, generator=gen) for i in range(_LONG)]


def _int_entry(ts, i):
    ts[i] = torch.arange(3, dtype=torch.int64)


def _inference_entry(ts, i):
    with torch.inference_mode():
        ts[i] = torch.ones(3)


def _overlapping_entry(ts, i):
    ts[i] = torch.ones(1).expand(4)


def _shrunk_entry(ts, i):
    base = torch.ones(64)
    ts[i] = base[32:]
    base.untyped_storage().resize_(16)


_LONG_ERRORS = {
    "int": (_int_entry, "has dtype Long"),
    "inference": (_inference_entry, "is an inference tensor"),
    "overlap": (_overlapping_entry, "share memory"),
    "shrunk": (_shrunk_entry, "has elements beyond the memory of its storage"),
}


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (the walks on threads need two)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("at", [3, _LONG - 2])
@pytest.mark.parametrize(
    "op, defect",
    [(op, d) for op in ("norm", "clip_", "scale_") for d in sorted(_LONG_ERRORS)
     if not (op == "norm" and d in ("inference", "overlap"))],  # reading those is fine
)
def test_long_list_errors_name_the_entry_and_modify_nothing(op, defect, at, threads):
    """A defect anywhere in a long list, on one thread or in another
    thread's part of the walk: the same error as in a short list, naming the
    entry, and nothing written."""
    make, message = _LONG_ERRORS[defect]
    tensors = _long_list(seed=40)
    make(tensors, at)
    good = [t for i, t in enumerate(tensors) if i != at]
    before = snapshot(good)
    call = {
        "norm": lambda: ops.multi_tensor_norm(tensors, 2.0, True),
        "clip_": lambda: ops.clip_(tensors, 0.1, 2.0),
        "scale_": lambda: ops.multi_tensor_scale_(tensors, torch.tensor(0.5)),
    }[op]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.raises(RuntimeError, match=rf"tensors\[{at}\] {message}" if defect != "overlap" else message):
            call()
    finally:
        torch.set_num_threads(saved)
    assert_untouched(good, before)


@pytest.mark.parametrize("op", ["norm", "clip_"])
def test_long_list_with_two_defects_reports_the_checks_in_their_order(op, two_threads):
    """Every tensor's dtype and device are checked before any is checked
    for writing, and both before any storage: the walk on threads leaves
    that order to the one-thread checks."""
    tensors = _long_list(seed=41)
    _shrunk_entry(tensors, 5)
    _inference_entry(tensors, 100)
    _int_entry(tensors, _LONG - 3)
    call = (lambda: ops.multi_tensor_norm(tensors, 2.0, False)) if op == "norm" else (
        lambda: ops.clip_(tensors, 0.1, 2.0))
    with pytest.raises(RuntimeError, match=rf"tensors\[{_LONG - 3}\] has dtype Long"):
        call()
    tensors[_LONG - 3] = torch.ones(3)
    if op == "clip_":
        with pytest.raises(RuntimeError, match=r"tensors\[100\] is an inference tensor"):
            call()
    tensors[100] = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"tensors\[5\] has elements beyond"):
        call()


@pytest.mark.parametrize("length", [3, _LONG])
@pytest.mark.parametrize("op", ["norm", "clip_"])
def test_argument_errors_come_before_a_storage_error(op, length, two_threads):
    """The order of the errors, as on CUDA and in the fake kernels: the
    tensors' checks, then the other arguments, then each tensor's storage
    (the table's check), whichever walk builds the table."""
    tensors = _long_list(seed=47)[:length]
    _shrunk_entry(tensors, length - 1)
    call = (lambda: ops.multi_tensor_norm(tensors, -1.0, False)) if op == "norm" else (
        lambda: ops.clip_(tensors, -1.0, 2.0))
    with pytest.raises(RuntimeError, match="ord must be a positive" if op == "norm" else "max_norm"):
        call()


def _unusual_long_list(numpy, walk):
    """A long list of entries the walk on threads must get right, late in
    the list: two storages over one numpy array (the second a view at an
    offset into it), bf16 and fp64 entries, 0-size ones; for
    walk="one-thread" also entries that send the list to the one-thread
    walk: a view with gaps and a copy-on-write clone of another tensor.
    Returns the list and the clone's source."""
    tensors = _long_list(seed=42)
    gen = torch.Generator().manual_seed(43)
    source = torch.randn(300, generator=gen)
    if walk == "one-thread":
        tensors[_LONG - 50] = torch._lazy_clone(source)
        tensors[_LONG - 40] = torch.randn(40, 6, generator=gen)[:, ::3]  # gaps
    memory = numpy.ones(64, dtype=numpy.float32)
    tensors[_LONG - 30] = torch.from_numpy(memory)
    tensors[_LONG - 20] = torch.from_numpy(memory)[8:]
    tensors[_LONG - 10] = torch.randn(33, dtype=torch.float64, generator=gen)
    tensors[_LONG - 5] = torch.randn(33, generator=gen).to(torch.bfloat16)
    return tensors, source


@pytest.mark.parametrize("walk", ["threads", "one-thread"])
@pytest.mark.parametrize("op", ["norm", "clip_", "scale_"])
def test_long_list_of_unusual_entries_matches_one_thread(op, walk):
    """The same bits, values and version bumps on two threads as on one,
    the two numpy entries written in list order where they share bytes, and
    the copy-on-write clone's source untouched."""
    numpy = pytest.importorskip("numpy")
    results = []
    for threads in (1, 2):
        tensors, source = _unusual_long_list(numpy, walk)
        source_before = source.clone()
        versions = [t._version for t in tensors]
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if op == "norm":
                out = ops.multi_tensor_norm(tensors, 2.0, True)
            elif op == "clip_":
                out = (ops.clip_(tensors, 0.5, 2.0),)
            else:
                ops.multi_tensor_scale_(tensors, torch.tensor(0.5))
                out = ()
        finally:
            torch.set_num_threads(saved)
        assert torch.equal(source, source_before)
        assert [t._version - v for t, v in zip(tensors, versions)] == [0 if op == "norm" else 1] * _LONG
        results.append((out, [t.clone() for t in tensors]))
    (out1, tensors1), (out2, tensors2) = results
    for a, b in zip(out1 + tuple(tensors1), out2 + tuple(tensors2)):
        assert_same_bits(a, b)
    first, second = tensors1[_LONG - 30], tensors1[_LONG - 20]  # second: first[8:], another storage
    if op == "norm":
        total, each = out1
        tensors, _ = _unusual_long_list(numpy, walk)
        assert_norm_close(total, ref_norm(tensors))
        assert_norm_close(each, ref_norms_each(tensors))
        return
    coef = torch.tensor(0.5) if op == "scale_" else ref_coef(0.5, out1[0].double()).float()
    assert torch.equal(first[:8], torch.full((8,), float(coef)))
    assert torch.equal(second, torch.full((56,), float(coef * coef)))  # scaled once more, after
    assert torch.equal(first[8:], second)


_READS = {
    "norm op": lambda gs, ps: ops.multi_tensor_norm(gs, 2.0, True),
    "norm op, slices": lambda gs, ps: ops.multi_tensor_norm(gs, 2.0, True, slices=3),
    "get_total_norm": lambda gs, ps: fastclip.get_total_norm(gs),
    "grad_norms": lambda gs, ps: fastclip.grad_norms(ps),
    "clip_ op, coefficient 1": lambda gs, ps: ops.clip_(gs, 1e30, 2.0),
    "clip_grad_norm_, coefficient 1": lambda gs, ps: fastclip.clip_grad_norm_(ps, 1e30),
}
_WRITES = {
    "clip_ op": lambda gs, ps: ops.clip_(gs, 0.5, 2.0),
    "clip_grad_norm_": lambda gs, ps: fastclip.clip_grad_norm_(ps, 0.5),
    "clip_grads_with_norm_": lambda gs, ps: fastclip.clip_grads_with_norm_(ps, 0.5, torch.tensor(20.0)),
    "scale op": lambda gs, ps: ops.multi_tensor_scale_(gs, torch.tensor(0.5)),
    "clamp op": lambda gs, ps: ops.multi_tensor_clamp_(gs, 0.5),
}


@pytest.mark.skipif(not hasattr(torch._C, "_is_cow_tensor"), reason="this torch has no copy-on-write tensors")
@pytest.mark.parametrize("entries", [1, 3000])
@pytest.mark.parametrize("call", sorted(_READS) + sorted(_WRITES))
def test_copy_on_write_gradients(call, entries):
    """Copy-on-write clones (torch._lazy_clone) of other tensors: an op
    that only reads leaves them sharing their memory, as torch's norms do
    (found in review: every norm took the mutable pointer, which copies
    them); one that writes writes its own copy and never the source, on the
    one-thread walk (a short list) and a long one. The values are the
    reference's either way."""
    gen = torch.Generator().manual_seed(48)
    sources = [torch.randn(3, 7, generator=gen).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float64)]
    sources = (sources * entries)[:max(entries, 3)]
    before = [s.clone() for s in sources]
    grads = [torch._lazy_clone(s) for s in sources]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    out = (_READS.get(call) or _WRITES[call])(grads, params)
    for s, b in zip(sources, before):
        assert_same_bits(s, b)
    if call in _READS:
        assert all(torch._C._is_cow_tensor(g) for g in grads)
        total = out[0] if isinstance(out, tuple) else out
        assert_norm_close(total, ref_norm(before))
        for g, b in zip(grads, before):
            assert_same_bits(g, b)
    else:
        assert not any(torch._C._is_cow_tensor(g) for g in grads)
        assert not any(torch.equal(g, b) for g, b in zip(grads, before))


def test_long_list_version_bumps_count_each_entry(two_threads):
    """The bumps on threads: a tensor twice in a list is bumped twice, as by
    one thread (its counter is atomic), and an inference tensor, which has
    none, is skipped under InferenceMode."""
    tensors = _long_list(seed=44)
    twice = tensors[10]
    tensors[_LONG - 1] = twice
    versions = [t._version for t in tensors]
    ops.multi_tensor_scale_(tensors, torch.tensor(0.5))
    bumps = [t._version - v for t, v in zip(tensors, versions)]
    assert bumps[10] == bumps[_LONG - 1] == 2
    assert all(b == 1 for i, b in enumerate(bumps) if i not in (10, _LONG - 1))
    with torch.inference_mode():
        frozen = torch.ones(3)
    mixed = _long_list(seed=45)
    mixed[_LONG // 2] = frozen
    versions = [t._version if not t.is_inference() else 0 for t in mixed]
    with torch.inference_mode():
        ops.clip_(mixed, 0.1, 2.0)
    assert float(frozen[0]) < 1
    assert all(t._version == v + 1 for t, v in zip(mixed, versions) if not t.is_inference())


@pytest.mark.parametrize("at", [3, _LONG - 2])
def test_long_list_tensor_without_counter_is_bumped_as_by_one_thread(at, two_threads):
    """A tensor that is not an inference tensor but has no version counter
    (.data set to a tensor made in InferenceMode): under InferenceMode its
    bump does nothing, outside it raises, as torch's bump does, wherever
    it is in the list (found in review: a worker thread read its own,
    disabled InferenceMode and raised after the list was written)."""
    def counterless():
        with torch.inference_mode():
            x = torch.ones(4)
        x.data = torch.ones(4)
        assert not x.is_inference()
        return x

    tensors = _long_list(seed=48)
    tensors[at] = counterless()
    with torch.inference_mode():
        ops.multi_tensor_scale_(tensors, torch.tensor(0.5))
    assert torch.equal(tensors[at].detach(), torch.full((4,), 0.5))
    tensors[at] = counterless()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        ops.multi_tensor_scale_(tensors, torch.tensor(0.5))


def test_long_list_storages_over_overlapping_memory_are_written_in_list_order(two_threads):
    """Two storages over one buffer at different starts (torch.frombuffer)
    at the end of a long list (another thread's part of the table's walk,
    which must still mark the list as holding foreign memory): the shared
    bytes are scaled once per entry, in list order. The entries before them
    are empty, so that the two are the two threads' pieces of the pass.
    (Without the mark a run of this test fails by chance, as the short-list
    test above: 100 calls.)"""
    n, shift = 1 << 16, 8
    for _ in range(100):
        tensors = [torch.ones(0) for _ in range(_LONG - 2)]
        memory = bytearray(4 * (n + shift))
        whole = torch.frombuffer(memory, dtype=torch.float32)
        whole.fill_(1.0)
        tensors.append(torch.frombuffer(memory, dtype=torch.float32, count=n))
        tensors.append(torch.frombuffer(memory, dtype=torch.float32, offset=4 * shift, count=n))
        ops.multi_tensor_scale_(tensors, torch.tensor(0.5))
        assert bool((whole[shift:n] == 0.25).all()) and bool((whole[:shift] == 0.5).all())
        assert bool((whole[n:] == 0.5).all())
