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
- each line once per chunk that needs it (twice only for a line that two
  chunks share, or a tensor listed twice).

Needs a C++ compiler (the one that builds the extension).
"""
from __future__ import annotations

import bisect
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cpu" / "prefetch_stream_harness.cpp"
LINE = 64
ADJACENT = 256  # PrefetchStream::kAdjacentBytes
LEAD = 16 << 10  # kPrefetchLeadBytes (multi_tensor_cpu.cpp)
HEAD = 16 << 10  # kPrefetchHeadBytes


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


def run(exe: Path, spans: Sequence[Tuple[int, int]], first: int, stop: int, lead: int, head: int,
        block: int) -> Run:
    text = f"{first} {stop} {lead} {head} {block} {len(spans)}\n" + "".join(f"{o} {b}\n" for o, b in spans)
    done = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = Run([], [])
    for k, line in enumerate(done.stdout.splitlines()):
        kind, value = line.split()
        (out.prefetched if kind == "P" else out.reads).append((k, int(value)))
    return out


def head_lines(spans: Sequence[Tuple[int, int]], first: int, stop: int, head: int) -> Tuple[Dict[int, int], int]:
    """Every line that holds a byte of a segment head, with the stream
    position of the first such byte (its deadline); and how many times
    lines are due, once per chunk that has head bytes in them."""
    positions = [0]
    for _, size in spans:
        positions.append(positions[-1] + size)
    lines: Dict[int, int] = {}
    due = 0
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
            due += 1
    return lines, due


def check(exe: Path, spans: Sequence[Tuple[int, int]], first: int = 0, stop: int = -1, lead: int = LEAD,
          head: int = HEAD, block: int = 128) -> Run:
    stop = len(spans) if stop < 0 else stop
    got = run(exe, spans, first, stop, lead, head, block)
    wanted, due = head_lines(spans, first, stop, head)

    asked: Dict[int, int] = {}  # line -> event index of its first prefetch
    for k, line in got.prefetched:
        asked.setdefault(line, k)
    extra = sorted(set(asked) - set(wanted))
    assert not extra, f"lines outside every segment head were prefetched: {extra[:5]}"
    # Once per chunk: a line twice only where two chunks share it (or a
    # tensor is listed twice). All are due by the last read unless the lead
    # is shorter than a block (the last tail is then never declared).
    assert len(got.prefetched) == due if lead >= block else len(got.prefetched) <= due

    by_deadline = sorted((d, line) for line, d in wanted.items())
    due = 0
    for k, pos in got.reads:  # stream positions grow from read to read
        # Timely: every head line needed before pos + lead was asked for before this read.
        while due < len(by_deadline) and by_deadline[due][0] < pos + lead:
            d, line = by_deadline[due]
            assert asked.get(line, k) < k, (
                f"line {line} (first read at stream position {d}) not prefetched when the reader was at {pos}")
            due += 1
    # Not early: when the reader reaches its next read, a line asked for is
    # at most lead + block + a line ahead of it.
    read_events = [k for k, _ in got.reads]
    for line, k_line in asked.items():
        after = bisect.bisect_right(read_events, k_line)
        if after < len(got.reads):
            pos = got.reads[after][1]
            assert wanted[line] < pos + block + lead + LINE, (
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
    got = check(harness, separate_spans(300, seed=block), block=block)
    assert len(got.prefetched) > 300  # every small gradient is a segment of its own


def test_one_tensor_in_chunks_gets_only_its_head_prefetched(harness):
    chunk = 256 << 10
    spans = [(i * chunk, chunk) for i in range(8)]
    got = check(harness, spans)
    assert {line for _, line in got.prefetched} == set(range(0, HEAD, LINE))


def test_mixed_gaps_sizes_and_repeats(harness):
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
    for lead, head in [(LEAD, HEAD), (1024, 4096), (LINE, LINE), (100, 1000), (1 << 20, 1 << 30)]:
        check(harness, spans, lead=lead, head=head)


def test_a_piece_touches_only_its_chunks(harness):
    spans = separate_spans(300, seed=1)
    got = check(harness, spans, first=37, stop=211)
    low, high = spans[37][0] // LINE * LINE, spans[210][0] + spans[210][1]
    assert all(low <= line < high for _, line in got.prefetched)


def test_no_lead_or_no_head(harness):
    spans = separate_spans(50, seed=2)
    got = check(harness, spans, head=0)
    assert got.prefetched == []
    got = check(harness, spans, lead=0, block=128)
    assert got.prefetched  # only what each block has just declared read


def test_the_checks_catch_a_stream_that_falls_behind(harness):
    # Negative control: the same run judged with a lead larger than the
    # stream's must fail the timeliness check.
    spans = separate_spans(100, seed=3)
    got = run(harness, spans, 0, len(spans), 1024, HEAD, 128)
    wanted, _ = head_lines(spans, 0, len(spans), HEAD)
    asked = {}
    for k, line in got.prefetched:
        asked.setdefault(line, k)
    late = [(k, pos) for k, pos in got.reads
            if any(d < pos + LEAD and asked.get(line, 1 << 62) > k for line, d in wanted.items())]
    assert late
