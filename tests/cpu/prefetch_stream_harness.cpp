// Runs fastclip::cpu::PrefetchStream (csrc/cpu/spans.h) as the CPU driver
// and kernels do, with its prefetch instruction replaced by a recorder, and
// prints what it asked for and when. Driven by tests/test_prefetch_stream.py.
//
// stdin:  first stop lead head count, then `count` lines "offset bytes block"
//         (byte offsets of the chunks in one buffer, in list order, and the
//         block size the kernel reading each chunk reports: 64, 128 or 256
//         bytes, by dtype)
// stdout: "P offset" for each line prefetched, in order, and "R pos" each
//         time the reader is about to read a block at stream position pos
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

static const char* g_base = nullptr;
static void record_line(const char* line) { std::printf("P %lld\n", static_cast<long long>(line - g_base)); }
#define FASTCLIP_PREFETCH_LINE(address) record_line(address)
#include "cpu/spans.h"

int main() {
  long long first = 0, stop = 0, lead = 0, head = 0, count = 0;
  if (std::scanf("%lld %lld %lld %lld %lld", &first, &stop, &lead, &head, &count) != 5) return 2;
  std::vector<long long> offsets(static_cast<size_t>(count)), sizes(static_cast<size_t>(count)),
      blocks(static_cast<size_t>(count));
  long long extent = 0;
  for (long long i = 0; i < count; ++i) {
    if (std::scanf("%lld %lld %lld", &offsets[i], &sizes[i], &blocks[i]) != 3 || blocks[i] <= 0) return 2;
    if (offsets[i] + sizes[i] > extent) extent = offsets[i] + sizes[i];
  }
  // A real buffer, line-aligned, so that every pointer the stream forms is valid.
  constexpr size_t kAlign = 64;
  char* base = static_cast<char*>(std::aligned_alloc(kAlign, (static_cast<size_t>(extent) / kAlign + 2) * kAlign));
  g_base = base;
  std::vector<fastclip::cpu::StreamSpan> spans(static_cast<size_t>(count));
  long long pos = 0;
  for (long long i = 0; i < count; ++i) {
    spans[i] = fastclip::cpu::StreamSpan{base + offsets[i], sizes[i], pos};
    pos += sizes[i];
  }
  fastclip::cpu::PrefetchStream stream(spans.data(), first, stop, lead, head);
  for (long long c = first; c < stop; ++c) {
    stream.start_span(c);
    const long long block = blocks[c];
    long long read = 0;
    for (; read + block <= sizes[c]; read += block) {  // as the kernels: whole blocks, then the tail
      stream.advance(block);
      std::printf("R %lld\n", spans[c].pos + read);
    }
    if (read < sizes[c]) std::printf("R %lld\n", spans[c].pos + read);
  }
  std::free(base);
  return 0;
}
