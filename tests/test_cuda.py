"""CUDA-only behaviour of the ops and functions (skipped without a GPU).

The device-parametrized suites (test_ops.py, test_api.py) already run every
list shape, dtype and order on CUDA; this file covers what only the CUDA
kernels have: the 16-byte vector path with misaligned heads and tails, chunk
and ticket boundaries, the scaled accumulation that replaces the CPU's rescue
pass, a tensor beyond 2**31 elements, bitwise determinism across launches,
CUDA-graph capture and replay, the absence of host syncs, the coefficient-1
early exit, several GPUs, and torch.compile on CUDA.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastclip
from fastclip import _ops
from testing import (
    DTYPES,
    HAS_CUDA,
    NORM_RTOL,
    ORDS,
    assert_identical,
    assert_norm_close,
    assert_same_bits,
    assert_scaled_close,
    assert_untouched,
    clip_scalars_cases,
    clone_params,
    dtype_id,
    make_grads,
    make_params,
    ord_id,
    poison,
    poison_allocator,
    ref_coef,
    ref_norm,
    ref_norms_each,
    ref_scaled,
    snapshot,
)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

ops = torch.ops.fastclip

CHUNK = 2**16  # kChunkElems in csrc/cuda/multi_tensor_kernels.h
SENTINEL = 12288.0  # exact in every dtype; no op here produces it from randn data


@pytest.fixture(autouse=True)
def _cuda_kernels():
    if HAS_CUDA and not _ops.has_kernel("cuda"):
        pytest.fail("a GPU is present but fastclip was built without CUDA kernels (FASTCLIP_FORCE_CUDA=1 to insist)")


def _poison_outputs(n: int) -> None:
    """NaN-filled freed blocks of the sizes the ops allocate outputs from."""
    poison_allocator([1] * 8 + [max(n, 1)] * 8, "cuda")


def _grads_cuda(params):
    return [p.grad for p in params if p.grad is not None]


# --------------------------------------------------------------- registration
def test_cuda_kernels_registered_and_no_fallback_warning():
    assert fastclip.build_info()["cuda_build"] is True
    assert "cuda" in fastclip.backend()
    params = make_params(make_grads([(7,), (3, 5)], torch.float32, "cuda", seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain-PyTorch fallback warns
        fastclip.clip_grad_norm_(params, 0.1)
        fastclip.grad_norms(params)
        fastclip.clip_grad_value_(params, 0.05)


# ------------------------------------------------ vector path and boundaries
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 33, 1000, CHUNK + 3])
def test_every_alignment_of_head_and_tail(dtype, numel):
    # buf[k : k + numel] for every k in 0..8: the data starts at every
    # offset within a 16-byte vector, so each head length (0 to 7 elements)
    # and each tail length is seen; everything around the views is NaN.
    buf = torch.full((numel + 16,), math.nan, dtype=dtype, device="cuda")
    views = [buf[k : k + numel] for k in range(9)]
    values = make_grads([(numel,)], dtype, "cuda", seed=numel)[0]
    for ord in ORDS:
        for v in views:
            poison(buf)
            v.copy_(values)
            _poison_outputs(1)
            total, each = ops.multi_tensor_norm([v], ord, True)
            assert_norm_close(total, ref_norm([values], ord), dtype)
            assert_same_bits(each[0], total)
    for v in views:
        buf.fill_(SENTINEL)
        v.copy_(values)
        # 0.3 (as float32, the coefficient's dtype): not exact, so rounding on
        # the head, vector and tail paths is seen; compared bitwise.
        coef = torch.tensor(0.3, device="cuda")
        ops.multi_tensor_scale_([v], coef)
        assert_scaled_close(v, ref_scaled(values, coef.item()))
        outside = torch.cat([buf[: v.storage_offset()], buf[v.storage_offset() + numel :]])
        assert (outside == SENTINEL).all(), "a write outside the view"


@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
def test_chunk_and_ticket_boundaries(ord):
    # Tensors of one chunk, exactly one, one more, several (the per-tensor
    # ticket reduction), empty ones between them, and every dtype.
    sizes = [CHUNK - 1, CHUNK, 0, CHUNK + 1, 5 * CHUNK + 7, 1, 0, 3 * CHUNK]
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(sizes))]
    tensors = make_grads([(n,) for n in sizes], dtypes, "cuda", seed=2)
    _poison_outputs(len(tensors))
    total, each = ops.multi_tensor_norm(tensors, ord, True)
    assert_norm_close(total, ref_norm(tensors, ord))
    assert_norm_close(each, ref_norms_each(tensors, ord))

    norm = ref_norm(tensors, ord)
    max_norm = 0.25 * norm.item()
    expected = [ref_scaled(t, ref_coef(max_norm, norm)) for t in tensors]
    _poison_outputs(1)
    assert_norm_close(ops.clip_(tensors, max_norm, ord), norm)
    for t, e in zip(tensors, expected):
        assert_scaled_close(t, e)


def test_gapped_views_on_cuda_scale_through_strides():
    base = torch.full((6, 20), SENTINEL, device="cuda")
    view = base[:, ::2]
    view.copy_(make_grads([(6, 10)], torch.float32, "cuda", seed=3)[0])
    dense = make_grads([(40,)], torch.float32, "cuda", seed=4)[0]
    norm = ref_norm([view, dense])
    expected = [ref_scaled(view, ref_coef(0.5, norm)), ref_scaled(dense, ref_coef(0.5, norm))]
    assert_norm_close(ops.clip_([view, dense], 0.5, 2.0), norm)
    assert_scaled_close(view, expected[0])
    assert_scaled_close(dense, expected[1])
    assert (base[:, 1::2] == SENTINEL).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gapped_views_of_more_than_8_dims_match_the_cpu_bits(dtype):
    # Views of more than kMaxViewDims dimensions are scaled by ATen in the
    # glue: in float for 16-bit dtypes, so that they get the kernels' bits
    # (ATen would round a float64 device coefficient to the dtype first).
    def run(device, coef):
        base = torch.full((3, 2, 2, 2, 2, 2, 2, 2, 4), SENTINEL, dtype=dtype, device=device)
        view = base[..., ::2]  # 9 dimensions with a gap
        view.copy_(make_grads([tuple(view.shape)], dtype, "cpu", seed=12, scale=3.0)[0].to(device))
        dense = make_grads([(40,)], dtype, "cpu", seed=13, scale=3.0)[0].to(device)
        ops.multi_tensor_scale_([view, dense], coef)
        assert (base[..., 1::2] == SENTINEL).all()
        return view.cpu(), dense.cpu()

    coef = torch.tensor(0.3, dtype=torch.float64)  # not exact in any dtype
    expected = run("cpu", coef)
    for on in ("cpu", "cuda"):
        for got, want in zip(run("cuda", coef.to(on)), expected):
            assert_same_bits(got, want)


# ------------------------------------------------- overflow and underflow
EXTREMES = [
    ("fp64 1e200", torch.float64, 1e200, [2.0, 1.0, 3.5]),
    ("fp64 1e-200", torch.float64, 1e-200, [2.0, 1.0, 3.5, math.inf]),
    ("fp64 subnormal", torch.float64, 5e-324, [2.0, 1.0]),
    ("fp32 1e30 p=12", torch.float32, 1e30, [12.0]),
    ("fp32 1e-30 p=12", torch.float32, 1e-30, [12.0]),
    # 0.3**1500 underflows a double, and so does 0.6**1500 (0.3 scaled by a
    # power of two): the running-max scale keeps the largest term at 1.
    ("fp32 0.3 p=1500", torch.float32, 0.3, [1500.0, 1e4]),
    ("bf16 0.3 p=1500", torch.bfloat16, 0.3, [1500.0]),
]


@pytest.mark.parametrize("dtype, value, ords", [e[1:] for e in EXTREMES], ids=[e[0] for e in EXTREMES])
def test_scaled_accumulation_matches_cpu_rescue(dtype, value, ords):
    for ord in ords:
        cpu = [torch.full(s, value, dtype=dtype) * (-1) ** i for i, s in enumerate([(10,), (3, 4), (CHUNK + 5,)])]
        cpu[1][0, 0] *= 3.0
        gpu = [t.cuda() for t in cpu]
        _poison_outputs(len(gpu))
        total, each = ops.multi_tensor_norm(gpu, ord, True)
        cpu_total, cpu_each = ops.multi_tensor_norm(cpu, ord, True)
        # Where float32 cannot hold the norm both give inf or 0; elsewhere they
        # agree to float32 rounding (summation orders differ).
        torch.testing.assert_close(total.cpu(), cpu_total, rtol=NORM_RTOL, atol=0)
        torch.testing.assert_close(each.cpu(), cpu_each, rtol=NORM_RTOL, atol=0)
        norm = ref_norm(cpu, ord)
        # Against the reference as float32 holds it: 0 for the fp64 norms
        # below float32's range (1e-200, subnormals), inf above it.
        assert_norm_close(total, norm.to(torch.float32))
        # A coefficient near 0.5 also for tiny norms, whose 1e-6 epsilon would
        # otherwise scale every value to 0 (and a kernel writing zeros pass).
        max_norm = 0.5 * (norm.item() + 1e-6)
        expected = [ref_scaled(t, ref_coef(max_norm, norm)) for t in cpu]
        ops.clip_(gpu, max_norm, ord)
        for t, e in zip(gpu, expected):
            assert torch.isfinite(t).all()
            assert_scaled_close(t, e)


def test_mixed_scales_across_dtypes():
    # fp64 tensors far outside float32 range next to ordinary fp32/bf16 ones:
    # the total combines sums of different scales.
    tensors = [
        torch.full((100,), 1e200, dtype=torch.float64, device="cuda"),
        make_grads([(CHUNK + 9,)], torch.float32, "cuda", seed=5)[0],
        torch.full((7,), 1e-250, dtype=torch.float64, device="cuda"),
        make_grads([(333,)], torch.bfloat16, "cuda", seed=6)[0],
    ]
    norm = ref_norm(tensors)
    expected = [ref_scaled(t, ref_coef(2.0, norm)) for t in tensors]
    total, each = ops.multi_tensor_norm(tensors, 2.0, True)
    assert torch.isinf(total)  # 1e201 has no float32
    # 1e-250 * sqrt(7) has no float32 either: compare with the reference as float32 holds it.
    assert_norm_close(each[1:], ref_norms_each(tensors[1:]).to(torch.float32))
    ops.clip_(tensors, 2.0, 2.0)
    for t, e in zip(tensors, expected):
        assert_scaled_close(t, e)
    torch.testing.assert_close(ref_norm(tensors).item(), 2.0, rtol=1e-12, atol=0)


# ------------------------------------------------------------- non-finite
@pytest.mark.parametrize("ord", ORDS, ids=ord_id)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_like_torch_and_error_before_writing(bad, ord):
    grads = make_grads([(17,), (CHUNK + 1,), (4, 9)], torch.float32, "cuda", seed=7)
    grads[1][CHUNK] = bad
    params, torch_params, checked = make_params(grads), make_params(grads), make_params(grads)
    total = fastclip.clip_grad_norm_(params, 1.0, ord)
    expected = torch.nn.utils.clip_grad_norm_(torch_params, 1.0, ord)
    assert_identical(total, expected)  # NaN, or the same inf (float32 gradients: float32 norms)
    for p, q in zip(params, torch_params):
        # Values too, not just where NaN and inf are (found in review): a
        # non-finite coefficient reaches every element of every tensor.
        assert_identical(p.grad, q.grad)

    before = snapshot(_grads_cuda(checked))
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        fastclip.clip_grad_norm_(checked, 1.0, ord, error_if_nonfinite=True)
    assert_untouched(_grads_cuda(checked), before)


# --------------------------------------------------------- large tensors
@pytest.mark.large
def test_bf16_tensor_beyond_2_pow_31_elements():
    # 2**31 + 5 bf16 elements (4.3 GB): every index and offset is 64-bit.
    # Ones everywhere, 2 in the last five, 3 just past index 2**31: the
    # norms are known exactly without a float64 copy of 17 GB.
    n = 2**31 + 5
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    x[-5:] = 2.0
    x[2**31 + 1] = 3.0
    sum_sq = (n - 5) * 1.0 + 4 * 2.0**2 + 3.0**2  # index 2**31 + 1 is one of the last five
    _poison_outputs(1)
    total, each = ops.multi_tensor_norm([x], 2.0, True)
    assert_norm_close(total, torch.tensor(math.sqrt(sum_sq), dtype=torch.float64))
    assert_same_bits(each[0], total)
    assert ops.multi_tensor_norm([x], math.inf, False)[0].item() == 3.0
    assert_norm_close(ops.multi_tensor_norm([x], 1.0, False)[0], torch.tensor(n - 5 + 4 * 2.0 + 3.0, dtype=torch.float64))

    max_norm = 0.3 * math.sqrt(sum_sq)  # 0.3: not exact in float32, so a wrong rounding shows
    coef = max_norm / (math.sqrt(sum_sq) + 1e-6)
    ops.clip_([x], max_norm, 2.0)
    for index, value in [(0, 1.0), (2**31 - 1, 1.0), (2**31, 2.0), (2**31 + 1, 3.0), (n - 1, 2.0)]:
        expected = torch.tensor(value * float(torch.tensor(coef, dtype=torch.float32)), dtype=torch.float32)
        assert x[index].item() == expected.to(torch.bfloat16).item(), index
    del x
    torch.cuda.empty_cache()


# ----------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_same_bits_over_10_runs(dtype):
    shapes = [(3 * CHUNK + 11,), (1000, 257), (5,), (64, 64, 3), (CHUNK,)] * 4
    grads = make_grads(shapes, dtype, "cuda", seed=8, scale=3.0)
    first = ops.multi_tensor_norm(grads, 2.0, True)
    first_clip = [g.clone() for g in grads]
    first_norm = ops.clip_(first_clip, 1.0, 2.0)
    for _ in range(9):
        _poison_outputs(len(grads))
        total, each = ops.multi_tensor_norm(grads, 2.0, True)
        assert_same_bits(total, first[0])
        assert_same_bits(each, first[1])
        again = [g.clone() for g in grads]
        assert_same_bits(ops.clip_(again, 1.0, 2.0), first_norm)
        for a, b in zip(again, first_clip):
            assert_same_bits(a, b)


# ------------------------------------------------------------ CUDA graphs
def _graph_params(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.GELU(), torch.nn.Linear(300, 10)).cuda()
    model(torch.randn(32, 64, device="cuda")).square().sum().backward()
    return list(model.parameters())


@pytest.mark.parametrize("max_norm", [0.01, 1e6], ids=["clips", "no_clip"])
def test_graph_capture_and_replay_equal_eager(max_norm):
    params = _graph_params(9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        for _ in range(2):
            fastclip.clip_grad_norm_(clone_params(params), max_norm)
            fastclip.grad_norms(clone_params(params))  # captured below too (found in review: not warmed up)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = fastclip.clip_grad_norm_(params, max_norm)
        _, each = fastclip.grad_norms(params)

    for step in range(3):  # new gradients in the captured storage each replay
        fresh = _graph_params(10 + step)
        for p, q in zip(params, fresh):
            p.grad.copy_(q.grad)
        eager = clone_params(params)
        graph.replay()
        expected = fastclip.clip_grad_norm_(eager, max_norm)
        _, expected_each = fastclip.grad_norms(eager)
        assert_same_bits(total, expected)
        assert_same_bits(each, expected_each)
        for p, q in zip(params, eager):
            assert_same_bits(p.grad, q.grad)


def test_graph_capture_of_norms_with_a_missing_gradient():
    # grad_norms puts each norm where its parameter is, through an index
    # copied from pinned host memory during the capture (found in review:
    # pin_memory() during a capture failed in torch versions whose host
    # allocator polled events then; the index must stay alive for replays).
    params = _graph_params(12)
    params.insert(1, torch.nn.Parameter(torch.zeros(3, device="cuda")))  # no gradient
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fastclip.grad_norms(params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, each = fastclip.grad_norms(params)
    for step in range(2):
        for p, q in zip([p for p in params if p.grad is not None], _graph_params(13 + step)):
            p.grad.copy_(q.grad)
        graph.replay()
        expected_total, expected_each = fastclip.grad_norms(params)
        assert_same_bits(total, expected_total)
        assert_same_bits(each, expected_each)
        assert each[1].item() == 0.0


def test_error_if_nonfinite_is_refused_in_a_graph_capture():
    # It reads the norm back on the host, which a capture cannot do: a clear
    # error before anything is queued, not CUDA's capture failure.
    params = _graph_params(14)
    before = snapshot(_grads_cuda(params))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="error_if_nonfinite=True reads the norm back on the host"):
        with torch.cuda.graph(graph):
            fastclip.clip_grad_norm_(params, 1e-3, error_if_nonfinite=True)
    torch.cuda.synchronize()
    assert_untouched(_grads_cuda(params), before)


# ------------------------------------------------------------- host syncs
def test_no_host_sync_in_the_clipping_path():
    params = _graph_params(11)
    grads = _grads_cuda(params)
    total_norm = fastclip.get_total_norm(grads)
    coef = torch.tensor(0.5, device="cuda")  # creating it from a Python float syncs
    max_norm = torch.tensor(0.2, device="cuda")  # a device max_norm is not read back
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastclip.clip_grad_norm_(params, max_norm)
        fastclip.clip_grads_with_norm_(params, max_norm, total_norm)
        fastclip.clip_grad_norm_(params, 0.1)
        fastclip.clip_grad_norm_(params, 1e6)
        fastclip.get_total_norm(grads, 3.5)
        fastclip.grad_norms(params)
        fastclip.clip_grads_with_norm_(params, 0.5, total_norm)
        fastclip.clip_grad_value_(params, 0.01)
        ops.multi_tensor_scale_(grads, coef)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_device_max_norm_gives_the_bits_of_a_float_one():
    # Written without a GPU: a CUDA max_norm takes the norm op and a scale by
    # the coefficient tensor; the coefficient is the fused op's, bit for bit.
    value = torch.tensor(0.1, dtype=torch.float64)
    params = _graph_params(11)
    grads = [p.grad.clone() for p in params]
    results = []
    for max_norm in (float(value), value.cuda()):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        total = fastclip.clip_grad_norm_(params, max_norm)
        results.append([total] + [p.grad for p in params])
    for a, b in zip(*results):
        assert_same_bits(a, b)


def test_sync_debug_mode_catches_a_sync():
    # Negative control: the mode is on and does catch a device-to-host read.
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.ones(3, device="cuda").sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------ coefficient of 1
def _time_scale(tensors, coef, repeats=5):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ops.multi_tensor_scale_(tensors, coef)  # warm-up
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        ops.multi_tensor_scale_(tensors, coef)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def test_coefficient_one_makes_no_pass_over_memory():
    # Values cannot tell "not written" from "written with the same bits",
    # and the glue bumps version counters whenever it launches a writing
    # kernel (the host does not know a device coefficient), so this
    # measures instead: with a device coefficient of exactly 1 a call must
    # cost its launch and host work, not a read-write pass over 4 GiB (~2 ms
    # on an H100/H200; a read-only pass would be half of that). It cannot
    # see a single stray write; the kernel's early return is what
    # guarantees none.
    tensors = [torch.randn(2**27, device="cuda") for _ in range(8)]  # 4 GiB of float32
    before = snapshot(tensors)
    one = _time_scale(tensors, torch.tensor(1.0, device="cuda"))
    for t, (copy, version) in zip(tensors, before):
        assert_same_bits(t, copy)
        assert t._version > version  # "may have written": see bump_versions in csrc/ops.h
    scaled = _time_scale(tensors, torch.tensor(1.0 - 2**-20, device="cuda"))
    assert one < 0.1 * scaled, (one, scaled)
    del tensors, before
    torch.cuda.empty_cache()


# ---------------------------------------------------------- several GPUs
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_several_gpus_and_cpu_in_one_list():
    grads = (
        make_grads([(17,), (CHUNK + 3,)], torch.float32, "cuda:1", seed=12)
        + make_grads([(40,)], torch.bfloat16, "cuda:0", seed=13)
        + make_grads([(9,)], torch.float64, "cpu", seed=14)
    )
    params = make_params(grads)
    norm = ref_norm(grads)
    total, each = fastclip.grad_norms(params)
    assert total.device == torch.device("cuda:1")
    assert_norm_close(each, ref_norms_each(grads))
    expected = [ref_scaled(g, ref_coef(0.5 * norm.item(), norm)) for g in grads]
    assert_norm_close(fastclip.clip_grad_norm_(params, 0.5 * norm.item()), norm)
    for p, e, g in zip(params, expected, grads):
        assert p.grad.device == g.device
        assert_scaled_close(p.grad, e)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_op_on_second_gpu_keeps_current_device():
    torch.cuda.set_device(0)
    tensors = make_grads([(33,), (CHUNK + 1,)], torch.float32, "cuda:1", seed=15)
    total, each = ops.multi_tensor_norm(tensors, 2.0, True)
    assert total.device == torch.device("cuda:1") and each.device == torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    assert_norm_close(total, ref_norm(tensors))


# ---------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    params = _graph_params(16)
    eager = clone_params(params)  # not a second backward: cuBLAS need not repeat its bits
    compiled = torch.compile(fastclip.clip_grad_norm_, fullgraph=True)
    total = compiled(params, 0.1)
    expected = fastclip.clip_grad_norm_(eager, 0.1)
    assert_same_bits(total, expected)
    for p, q in zip(params, eager):
        assert_same_bits(p.grad, q.grad)


def _at_odd_byte(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A CUDA tensor whose data starts one byte after an aligned address."""
    raw = torch.zeros(numel * torch.empty(0, dtype=dtype).element_size() + 1, dtype=torch.uint8, device="cuda")
    t = torch.empty(0, dtype=dtype, device="cuda").set_(raw.untyped_storage()[1:], 0, (numel,), (1,))
    assert t.data_ptr() % t.element_size() == 1 % t.element_size()
    return t


def test_data_at_an_odd_byte_is_refused_before_anything_runs():
    # Found in review (not run on a GPU when written): element loads at odd
    # addresses fault with a misaligned address, which ends the context.
    good = torch.ones(5, device="cuda")
    odd = _at_odd_byte(1000, torch.float32)
    for call in (lambda: ops.multi_tensor_norm([good, odd], 2.0, False),
                 lambda: ops.multi_tensor_scale_([good, odd], torch.tensor(0.5)),
                 lambda: ops.multi_tensor_clamp_([good, odd], 0.1),
                 lambda: ops.clip_([good, odd], 0.1, 2.0)):
        with pytest.raises(RuntimeError, match=r"tensors\[1\] starts at a byte address"):
            call()
        assert torch.equal(good, torch.ones(5, device="cuda"))
    torch.cuda.synchronize()  # the context is still usable


def test_scalars_at_an_odd_byte_are_refused():
    # Found in review (not run on a GPU when written): the kernels load a
    # device coefficient and clip_scalars_'s tensors as whole elements too
    # (no ATen kernel may touch such a tensor either: it would fault alike).
    t = torch.full((3 * CHUNK,), 2.0, device="cuda")
    coef = _at_odd_byte(1, torch.float32)
    with pytest.raises(RuntimeError, match="coef starts at a byte address"):
        ops.multi_tensor_scale_([t], coef)
    assert bool((t == 2.0).all())
    norm = torch.tensor(3.0, device="cuda")
    logs = [torch.zeros((), device="cuda"), torch.ones((), device="cuda"),
            torch.zeros((), dtype=torch.int64, device="cuda")]
    odd_norm = _at_odd_byte(1, torch.float32).reshape(())
    odd_log = _at_odd_byte(1, torch.float32).reshape(())
    for args, name in (((odd_norm, 1.0, None, None, None, None, False, *logs, False), "norm"),
                       ((norm, 1.0, coef, None, None, None, False, *logs, False), "loss_scale"),
                       ((norm, 1.0, None, None, None, None, False, odd_log, *logs[1:], False), "last_norm")):
        with pytest.raises(RuntimeError, match=f"{name} starts at a byte address"):
            ops.clip_scalars_(*args)
    torch.cuda.synchronize()  # the context is still usable


def test_clamp_of_entries_over_the_same_bytes_in_two_dtypes_follows_list_order():
    # Found in review (not run on a GPU when written): one launch would read
    # and write a float32 gradient and its bfloat16 view at once.
    gen = torch.Generator().manual_seed(5)
    # bf16-exact floats: the low halves the bf16 view sees are zeros, no NaN patterns.
    base = (torch.randn(3 * CHUNK + 17, generator=gen) * 3).bfloat16().float()
    results = []
    for device in ("cpu", "cuda"):
        g = base.to(device)
        ops.multi_tensor_clamp_([g, g.view(torch.bfloat16)], 1e-3)
        results.append(g.cpu())
    assert_same_bits(results[1], results[0])


def test_device_coefficient_inside_a_scaled_tensor_is_read_once():
    # Found in review (not run on a GPU when written): blocks that start
    # after a[0] was scaled would read the square of the coefficient.
    a = torch.full((8 * CHUNK,), 0.5, device="cuda")
    b = torch.full((8 * CHUNK,), 3.0, device="cuda")
    ops.multi_tensor_scale_([a, b], a[0])
    assert torch.equal(a, torch.full_like(a, 0.25)) and torch.equal(b, torch.full_like(b, 1.5))



def _same_bytes_other_storage(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s first element through another storage object over the same bytes."""
    if kind == "dlpack":
        return torch.from_dlpack(t[:1])[0]
    other = torch.empty(0, dtype=t.dtype, device=t.device)
    return other.set_(t.untyped_storage()[t.element_size():], 0, ())  # t[1], from a second storage


@pytest.mark.parametrize("kind", ["dlpack", "storage_slice"])
def test_device_coefficient_over_the_same_bytes_through_another_storage_is_read_once(kind):
    # Found in review (not run on a GPU when written): the copy was made
    # only for the same storage object, and these are other objects.
    a = torch.full((8 * CHUNK,), 0.5, device="cuda")
    b = torch.full((8 * CHUNK,), 3.0, device="cuda")
    coef = _same_bytes_other_storage(a, kind)
    assert coef.untyped_storage()._cdata != a.untyped_storage()._cdata  # another storage object
    ops.multi_tensor_scale_([a, b], coef)
    assert torch.equal(a, torch.full_like(a, 0.25)) and torch.equal(b, torch.full_like(b, 1.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("coef_device", ["cpu", "cuda"])
def test_view_with_elements_at_one_address_is_scaled_once_per_address(dtype, coef_device):
    # Found in review (not run on a GPU when written): as_strided((N, 2),
    # (1, 1)) passes torch's overlap check ("too hard"); the strided kernel
    # scaled its shared addresses in two threads at once, some twice. Each
    # address is scaled once, as on the CPU.
    n = 8 * CHUNK
    expected = {}
    for device in ("cpu", "cuda"):
        base = (torch.arange(1, n + 2, dtype=torch.float64) % 1000).to(dtype).to(device)
        view = base.as_strided((n, 2), (1, 1))
        ops.multi_tensor_scale_([view], torch.tensor(0.5, dtype=torch.float64, device=coef_device if device == "cuda" else "cpu"))
        expected[device] = base.cpu()
    assert_same_bits(expected["cuda"], expected["cpu"])
    reference = ((torch.arange(1, n + 2, dtype=torch.float64) % 1000).to(dtype).double() * 0.5).to(dtype)
    assert_same_bits(expected["cpu"], reference)


def test_clip_scalars_on_cuda_matches_the_cpu_op_bitwise():
    """The one-thread CUDA kernel of clip_scalars_ (inputs of every dtype on
    the device) against the CPU op on 400 argument sets, every output and
    log bit for bit; the call itself reads nothing back to the host."""
    def run(case, device):
        args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
        logs = (torch.full((), math.nan, device=device), torch.full((), math.nan, device=device),
                torch.tensor(7, dtype=torch.int64, device=device))
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = torch.ops.fastclip.clip_scalars_(
                args["norm"], args["max_norm"], args["loss_scale"], args["extra_scale"], args["found_inf"],
                args["extra_found"], args["skip_inf_divisor"], *logs, args["count_skip"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return [t.cpu() for t in (*out, *logs)]

    for case in clip_scalars_cases():
        for got, want in zip(run(case, "cuda"), run(case, "cpu")):
            assert_identical(got, want), case


@pytest.mark.parametrize("name", ["loss_scale", "found_inf", "last_norm", "skipped"])
def test_clip_scalars_refuses_an_argument_on_another_device(name):
    """A CPU tensor among CUDA ones would be read by the kernel as device
    memory: refused, naming it, before anything is written."""
    args = dict(norm=torch.tensor(3.0, dtype=torch.float64, device="cuda"), max_norm=1.0,
                loss_scale=torch.tensor(2.0, device="cuda"), extra_scale=None,
                found_inf=torch.tensor(0.0, device="cuda"), extra_found=None, skip_inf_divisor=True,
                last_norm=torch.full((), math.nan, device="cuda"), last_coef=torch.full((), math.nan, device="cuda"),
                skipped=torch.tensor(7, device="cuda"), count_skip=True)
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=f"{name} is on cpu but norm is on cuda"):
        torch.ops.fastclip.clip_scalars_(**args)
    assert math.isnan(args["last_coef"].item()) and args["skipped"].item() == 7


def test_clipped_optimizer_with_cpu_and_cuda_parameters_steps_as_torch():
    # Found in review (not run on a GPU when written): folded into a fused
    # step, a GPU divisor and flag reach torch's CPU kernel by a copy it
    # does not wait for. Such a list is clipped, then stepped, as torch's
    # recipe.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, device=d)) for d in ("cuda", "cpu", "cuda", "cpu")]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, refs):
        p.grad = torch.randn_like(p) * 10
        r.grad = p.grad.clone()
    opt = fastclip.ClippedOptimizer(torch.optim.AdamW(params, lr=0.1, fused=True), max_norm=1.0)
    ref_opt = torch.optim.AdamW(refs, lr=0.1, fused=True)
    for _ in range(3):
        torch.nn.utils.clip_grad_norm_(refs, 1.0)
        ref_opt.step()
        opt.step()
        for p, r in zip(params, refs):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
        for p, r in zip(params, refs):
            p.grad = torch.randn_like(p) * 10
            r.grad = p.grad.clone()


def test_negative_bit_views_and_coefficient_on_cuda():
    # The Negative kernels (not run on a GPU when written): a view's bytes
    # are scaled as stored, and a coefficient is read for its value, which
    # the kernels would otherwise take from its bytes (the wrong sign).
    base = torch.tensor([3.0, -4.0, 12.0], device="cuda")
    t = torch.tensor([1.0, -2.0], device="cuda")
    torch.ops.fastclip.multi_tensor_scale_([torch._neg_view(base), t],
                                           torch._neg_view(torch.tensor(-0.5, device="cuda")))
    assert_same_bits(base.cpu(), torch.tensor([1.5, -2.0, 6.0]))
    assert_same_bits(t.cpu(), torch.tensor([0.5, -1.0]))
