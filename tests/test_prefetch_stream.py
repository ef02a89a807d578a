"""The CPU kernels' software prefetcher (PrefetchStream, csrc/cpu/spans.h).

It never changes a result, so the op tests cannot see it; these tests run it
as the driver and kernels do (tests/cpu/prefetch_stream_harness.cpp, with
the prefetch instruction replaced by a recorder) and check what it asks
for and when:

- timely: when the reader is at stream position p, every line of a segment
  head that it will read before p + lead has been asked for;
- not early: no line is asked for more than lead (plus a block and a line)
  ahead of the reader;
- only what is needed: every line asked for holds bytes of a segment head
  (the first `head` bytes of a run of chunks that follow each other in
  memory); nothing past the head, outside the chunks or outside the piece
  [first, stop);
- each line as many times as chunks have head bytes in it (once, twice
  for a line two chunks share or a tensor listed twice).

Needs a C++ compiler (the one that builds the extension).
"""
from __future__ import annotations

import bisect
import os
import platform
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cpu" / "prefetch_stream_harness.cpp"
LINE = 64
ADJACENT = 256  # PrefetchStream::kAdjacentBytes
LEAD = 16 << 10  # kPrefetchLeadBytes (multi_tensor_cpu.cpp)
HEAD = 16 << 10  # kPrefetchHeadBytes
WHOLE = 1 << 62  # PrefetchStream::kWholeSegments


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("prefetch") / "prefetch_stream_harness"
    cmd = [compiler, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", str(ROOT / "csrc"), str(HARNESS), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return exe


@dataclass
class Run:
    prefetched: List[Tuple[int, int]]  # (event index, line offset)
    reads: List[Tuple[int, int]]  # (event index, stream position)


Blocks = Union[int, Sequence[int]]


def run(exe: Path, spans: Sequence[Tuple[int, int]], first: int, stop: int, lead: int, head: int,
        blocks: Blocks) -> Run:
    if isinstance(blocks, int):
        blocks = [blocks] * len(spans)
    text = f"{first} {stop} {lead} {head} {len(spans)}\n" + "".join(
        f"{o} {b} {k}\n" for (o, b), k in zip(spans, blocks))
    done = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = Run([], [])
    for k, line in enumerate(done.stdout.splitlines()):
        kind, value = line.split()
        (out.prefetched if kind == "P" else out.reads).append((k, int(value)))
    return out


def head_lines(spans: Sequence[Tuple[int, int]], first: int, stop: int, head: int) -> Tuple[Dict[int, int], Counter]:
    """Every line that holds a byte of a segment head, with the stream
    position of the first such byte (its deadline); and how many chunks
    have head bytes in each line (a line shared by two chunks, or a tensor
    listed twice, is due once per chunk)."""
    positions = [0]
    for _, size in spans:
        positions.append(positions[-1] + size)
    lines: Dict[int, int] = {}
    due: Counter = Counter()
    previous_end = None
    head_end = 0
    for i in range(first, stop):
        offset, size = spans[i]
        continues = previous_end is not None and 0 <= offset - previous_end <= ADJACENT
        previous_end = offset + size
        if not continues:
            head_end = positions[i] + head
        wanted = min(size, head_end - positions[i])
        if wanted <= 0:
            continue
        for line in range(offset // LINE * LINE, offset + wanted, LINE):
            deadline = positions[i] + max(0, line - offset)
            lines[line] = min(lines.get(line, deadline), deadline)
            due[line] += 1
    return lines, due


def check(exe: Path, spans: Sequence[Tuple[int, int]], first: int = 0, stop: int = -1, lead: int = LEAD,
          head: int = HEAD, blocks: Blocks = 128, judged_lead: Optional[int] = None) -> Run:
    """Runs the stream and checks it; `judged_lead` judges a run made with
    `lead` as if it had been made with another (the negative control)."""
    stop = len(spans) if stop < 0 else stop
    got = run(exe, spans, first, stop, lead, head, blocks)
    lead = lead if judged_lead is None else judged_lead
    largest_block = blocks if isinstance(blocks, int) else max(blocks)
    wanted, due = head_lines(spans, first, stop, head)

    asked: Dict[int, int] = {}  # line -> event index of its first prefetch
    for k, line in got.prefetched:
        asked.setdefault(line, k)
    extra = sorted(set(asked) - set(wanted))
    assert not extra, f"lines outside every segment head were prefetched: {extra[:5]}"
    # Once per chunk that needs the line. All are due by the last read
    # unless the lead is shorter than a block (the last tail is then never
    # declared read).
    times = Counter(line for _, line in got.prefetched)
    if lead >= largest_block:
        assert times == due, "lines prefetched a different number of times than chunks need them"
    else:
        assert all(times[line] <= due[line] for line in times)

    by_deadline = sorted((d, line) for line, d in wanted.items())
    next_due = 0
    for k, pos in got.reads:  # stream positions grow from read to read
        # Timely: every head line needed before pos + lead was asked for before this read.
        while next_due < len(by_deadline) and by_deadline[next_due][0] < pos + lead:
            d, line = by_deadline[next_due]
            assert asked.get(line, k) < k, (
                f"line {line} (first read at stream position {d}) not prefetched when the reader was at {pos}")
            next_due += 1
    # Not early: when the reader reaches its next read, a line asked for is
    # at most lead + a block + a line ahead of it.
    read_events = [k for k, _ in got.reads]
    for line, k_line in asked.items():
        after = bisect.bisect_right(read_events, k_line)
        if after < len(got.reads):
            pos = got.reads[after][1]
            assert wanted[line] < pos + largest_block + lead + LINE, (
                f"line {line} (read at {wanted[line]}) prefetched when the reader was before {pos}")
    return got


def separate_spans(count: int, seed: int) -> List[Tuple[int, int]]:
    """Gradients as separate allocations between their parameters: sizes of
    2 B to 20 KB at 2-byte alignment, gaps of 1 to 9 KB."""
    rng = random.Random(seed)
    spans, offset = [], 3 * LINE + 6
    for _ in range(count):
        size = 2 * rng.randint(1, 10000)
        spans.append((offset, size))
        offset += size + 2 * rng.randint(512, 4500)
    return spans


@pytest.mark.parametrize("block", [64, 128, 256])
def test_separate_gradients_are_prefetched_whole_and_ahead(harness, block):
    got = check(harness, separate_spans(300, seed=block), blocks=block)
    assert len(got.prefetched) > 300  # every small gradient is a segment of its own


def test_one_tensor_in_chunks_gets_only_its_head_prefetched(harness):
    chunk = 256 << 10
    spans = [(i * chunk, chunk) for i in range(8)]
    got = check(harness, spans)
    assert [line for _, line in got.prefetched] == list(range(0, HEAD, LINE))


def test_one_tensor_in_chunks_gets_all_of_it_prefetched_with_whole_segments(harness):
    chunk = 256 << 10
    spans = [(i * chunk, chunk) for i in range(8)]
    got = check(harness, spans, head=WHOLE)
    assert [line for _, line in got.prefetched] == list(range(0, 8 * chunk, LINE))


def test_separate_gradients_with_whole_segments(harness):
    spans = separate_spans(300, seed=11)
    got = check(harness, spans, head=WHOLE, blocks=128)
    assert len(got.prefetched) == sum(head_lines(spans, 0, len(spans), WHOLE)[1].values())


def test_mixed_gaps_sizes_dtypes_and_repeats(harness):
    rng = random.Random(7)
    spans, offset = [], 10
    for _ in range(400):
        size = rng.choice([0, 2, 62, 64, 130, 4096, 50000, 262144])
        gap = rng.choice([0, 2, 64, 200, 256, 258, 300, 1024, 70000])
        if spans and rng.random() < 0.05:
            spans.append(spans[rng.randrange(len(spans))])  # the same tensor twice in a list
            continue
        offset += gap
        spans.append((offset, size))
        offset += size
    blocks = [rng.choice([64, 128, 256]) for _ in spans]  # fp16/bf16, fp32, fp64 chunks in one list
    for lead, head in [(LEAD, HEAD), (1024, 4096), (256, LINE), (300, 1000), (1 << 20, 1 << 30), (LEAD, WHOLE)]:
        check(harness, spans, lead=lead, head=head, blocks=blocks)


def test_a_piece_touches_only_its_chunks(harness):
    spans = separate_spans(300, seed=1)
    got = check(harness, spans, first=37, stop=211)
    low, high = spans[37][0] // LINE * LINE, spans[210][0] + spans[210][1]
    assert all(low <= line < high for _, line in got.prefetched)


def test_no_lead_or_no_head(harness):
    spans = separate_spans(50, seed=2)
    got = check(harness, spans, head=0)
    assert got.prefetched == []
    got = check(harness, spans, lead=0, blocks=128)
    assert got.prefetched  # only what each block has just declared read


def test_the_checks_catch_a_stream_that_falls_behind(harness):
    # Negative control: a run made with a 1 KiB lead, judged as if its lead
    # were 16 KiB, fails the timeliness check.
    spans = separate_spans(100, seed=3)
    with pytest.raises(AssertionError, match="not prefetched when the reader was at"):
        check(harness, spans, lead=1024, judged_lead=LEAD)


# ------------------------------------------------- the driver's choice
# Which head the extension's driver gives the stream: all of each segment
# on Intel CPUs, its first 16 KiB elsewhere, FASTCLIP_CPU_PREFETCH=all|heads
# overriding (csrc/cpu/multi_tensor_cpu.cpp). Run in child processes: the
# choice is made once per process.
CHILD = r"""
import hashlib, sys, warnings, torch, fastclip
g = torch.Generator().manual_seed(5)
ts = [torch.randn(n, generator=g).to(d) for n in (100_000, 3, 70_000, 300_001)
      for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    total, each = torch.ops.fastclip.multi_tensor_norm(ts, 2.0, True)
    clipped = torch.ops.fastclip.clip_(ts, 1.0, 2.0)
    # A split-path call: the sparse gradient goes to plain PyTorch, the dense one to the kernels.
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(100_000))
    a.grad = torch.tensor([5.0, 0, 0, 0]).to_sparse()
    b.grad = torch.full((100_000,), 5.0)
    fastclip.clip_grad_value_([a, b], 1.0)
info = fastclip.build_info()
print("|".join(str(info[k]) for k in ("cpu_prefetch", "cpu_prefetch_head_bytes", "cpu_prefetch_decided_by")))
print("|".join(str(w.message).replace("\n", " ") for w in caught if "FASTCLIP_CPU_PREFETCH" in str(w.message)))
digest = hashlib.sha256(b"".join(t.view(torch.uint8).numpy().tobytes() for t in ts + [a.grad.to_dense(), b.grad]))
print(total.numpy().tobytes().hex(), each.numpy().tobytes().hex(), clipped.numpy().tobytes().hex(), digest.hexdigest())
"""
WHOLE_BYTES, HEAD_BYTES = str(WHOLE), str(HEAD)


def _child(env_value: Optional[str]) -> Tuple[List[str], str, str]:
    """(mode, head bytes, decided by), the prefetch warnings (Python's or
    logged), the results' bits."""
    fastclip = pytest.importorskip("fastclip")
    if not fastclip._ops.available():
        pytest.skip("the compiled extension is not loaded")
    # The child imports the fastclip this process imported (a mutant's copy, say).
    package_root = str(Path(fastclip.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    env.pop("FASTCLIP_CPU_PREFETCH", None)
    if env_value is not None:
        env["FASTCLIP_CPU_PREFETCH"] = env_value
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    choice, warned, bits = done.stdout.rstrip("\n").split("\n")
    # torch turns a C++ warning into a Python one on some call paths and
    # logs it to stderr on others (torch.ops calls, build_info).
    prefetch_logs = [line for line in done.stderr.splitlines() if "FASTCLIP_CPU_PREFETCH" in line]
    return choice.split("|"), "|".join(filter(None, [warned, *prefetch_logs])), bits


def _vendor_mode() -> Optional[str]:
    """What the CPU rule gives here: all on Intel x86 and on AMD x86 without
    AVX-512 (before Zen 4), heads on AMD's with it, on other x86 vendors and
    on every other architecture; None where this test cannot tell."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "heads"
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    text = cpuinfo.read_text()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if "GenuineIntel" in text:
        return "all"
    if "AuthenticAMD" in text:
        return None if flags is None else ("heads" if "avx512f" in flags else "all")
    return "heads"


def test_driver_choice_by_vendor_and_by_variable_same_bits():
    outputs = {}
    expected = _vendor_mode()
    for value in (None, "all", "heads", "everything"):
        (mode, head, decided_by), warned, bits = _child(value)
        assert head == (WHOLE_BYTES if mode == "all" else HEAD_BYTES)
        if value in ("all", "heads"):
            assert (mode, decided_by, warned) == (value, "FASTCLIP_CPU_PREFETCH", "")
        else:
            # Unset, or a bad value (ignored with a warning: a speed hint, never an error).
            assert expected is None or mode == expected
            if value is None:
                assert (decided_by, warned) == ("CPU model", "")
            else:
                assert decided_by == "CPU model (FASTCLIP_CPU_PREFETCH='everything' ignored)"
                assert warned.count("FASTCLIP_CPU_PREFETCH='everything' is neither 'all' nor 'heads'; ignored") == 1
        outputs[value] = bits
    # The prefetcher decides when lines arrive, never what is computed.
    assert len(set(outputs.values())) == 1
