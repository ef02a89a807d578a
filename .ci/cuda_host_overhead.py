"""Host cost per call of the CUDA ops (needs a GPU): wall time to issue a
call, which is what a training step pays when the GPU work is short.

For 10,000 float32 tensors of 64..4096 elements (the DESIGN.md list): the
median over 50 calls after 5 warm-ups of (a) fastclip.clip_grad_norm_ on
parameters (gradient collection included), (b) torch.ops.fastclip.clip_ on a
prepared list, (c) the GPU time of (b) from CUDA events.
"""
import random
import statistics
import time

import torch

import fastclip


def median_wall_us(fn, calls=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()  # outside the timed region: the host cost alone
    return statistics.median(samples), min(samples), max(samples)


# Cycles the GPU spins before the timed calls, so that the host queues all
# of them first and the events measure GPU work, not the host's issue rate.
SPIN_CYCLES = int(5e8)


def gpu_us(fn, calls=50):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN_CYCLES)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def main():
    rng = random.Random(0)
    sizes = [rng.randint(64, 4096) for _ in range(10_000)]
    params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "fastclip", fastclip.__version__)
    print("host us per call (median, min, max):")
    print("  clip_grad_norm_(params, 1e6)      ", median_wall_us(lambda: fastclip.clip_grad_norm_(params, 1e6)))
    # After a few calls this clip's coefficient is exactly 1 (a no-op on the
    # device); the host issues the same launches either way.
    print("  clip_grad_norm_(params, 0.1)      ", median_wall_us(lambda: fastclip.clip_grad_norm_(params, 0.1)))
    print("  ops.clip_(grads, 1e6, 2.0)        ", median_wall_us(lambda: torch.ops.fastclip.clip_(grads, 1e6, 2.0)))
    print("  ops.multi_tensor_norm(grads, 2, T)", median_wall_us(lambda: torch.ops.fastclip.multi_tensor_norm(grads, 2.0, True)))
    print("  torch clip_grad_norm_(params, 1e6)", median_wall_us(lambda: torch.nn.utils.clip_grad_norm_(params, 1e6), calls=10))
    print("GPU us per call, ops.clip_(grads, 1e6, 2.0):", gpu_us(lambda: torch.ops.fastclip.clip_(grads, 1e6, 2.0)))


if __name__ == "__main__":
    main()
