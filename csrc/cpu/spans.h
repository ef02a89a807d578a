// fastclip CPU span kernels (ATen-free): one contiguous span of one dtype
// per call. The driver in multi_tensor_cpu.cpp cuts tensors into spans and
// runs them on ATen's threads.
#pragma once

#include <cstdint>

#define FASTCLIP_ALWAYS_INLINE inline __attribute__((always_inline))

// One cache line asked for ahead of use, into L2 (prefetcht2 on x86; t0
// and nta measured slower, and prefetching for writing, prefetchw, no
// faster in the scale pass). tests/test_prefetch_stream.py defines it to
// record the lines instead.
#ifndef FASTCLIP_PREFETCH_LINE
#define FASTCLIP_PREFETCH_LINE(address) __builtin_prefetch((address), 0, 1)
#endif

#include "../fastclip.h"

namespace fastclip {
namespace cpu {

// A thread's chunks as one stream of bytes: each chunk's bytes, and where
// they start in the stream (bytes of the chunks before it).
struct StreamSpan {
  char* data;
  int64_t bytes;
  int64_t pos;
};

// A software prefetcher that walks a thread's chunks a fixed number of
// bytes ahead of the kernel reading them, one cache line per line read.
// Hardware prefetchers follow one address stream and lose it wherever the
// next gradient starts more than a few lines after the last one ended (a
// model's gradients are separate allocations, with their parameters in
// between): each restart costs demand misses. In a C++ model of 10,000
// gradients of 8 KiB on average with 4 KiB between them, one core read
// them at 8.5 GB/s against 25 GB/s for the same bytes back to back (see
// the README's Design section). A steady stream, rather than a burst per
// chunk, keeps the prefetches from queueing ahead of the running chunk's
// own loads. Each segment (a run of chunks that follow each other in
// memory) is prefetched up to `head` bytes: its head where the hardware
// takes the stream over past it (prefetching all of a large tensor
// measured 13-18% slower on an AMD Zen 4 VM, one thread, 256 MB buffers),
// all of it where the hardware falls behind (1.2-1.5x faster on an Intel
// Xeon VM); the driver picks (multi_tensor_cpu.cpp). It never changes what
// the kernels compute, only when lines arrive.
class PrefetchStream {
 public:
  static constexpr int64_t kLine = 64;
  // A chunk that starts at most this far after the previous one ended
  // continues its segment: the hardware prefetchers bridged gaps of 256
  // bytes at full speed and lost the stream at 1 KiB (one thread, fp32).
  static constexpr int64_t kAdjacentBytes = 256;
  // A head that covers every segment whole: stream positions (bytes of one
  // call's tensors) stay far below it, and a position plus it below 2^63.
  static constexpr int64_t kWholeSegments = int64_t{1} << 62;

  PrefetchStream() = default;  // prefetches nothing (kernels given it only call advance)
  // Chunks [first, stop) of `spans`: the first `head` bytes of each
  // segment, `lead` bytes ahead of the reader (both at most 2^62: stream
  // positions are added to them).
  PrefetchStream(const StreamSpan* spans, int64_t first, int64_t stop, int64_t lead, int64_t head)
      : spans_(spans), next_(first), stop_(stop), lead_(lead), head_(head) {
    next_span();
  }

  // The kernel starts reading chunk c (this resets any drift of the
  // kernels' per-block accounting, which leaves tails out).
  FASTCLIP_ALWAYS_INLINE void start_span(int64_t c) {
    target_ = spans_[c].pos + lead_;
    pump();
  }
  // The kernel has read `bytes` more of the current chunk.
  FASTCLIP_ALWAYS_INLINE void advance(int64_t bytes) {
    target_ += bytes;
    pump();
  }

 private:
  // The next line is always one to prefetch (a chunk's last line is
  // followed at once by the next chunk's first, which may start inside it).
  FASTCLIP_ALWAYS_INLINE void pump() {
    while (line_pos_ < target_) {
      FASTCLIP_PREFETCH_LINE(reinterpret_cast<const char*>(line_));
      line_ += kLine;
      line_pos_ += kLine;
      if (line_ >= end_ || line_pos_ >= head_end_) next_span();
    }
  }
  // Moves to the first line of the next chunk that has one to prefetch.
  void next_span() {
    for (; next_ < stop_; ++next_) {
      const StreamSpan& s = spans_[next_];
      const auto address = reinterpret_cast<uintptr_t>(s.data);
      const bool continues = address >= previous_end_ && address - previous_end_ <= kAdjacentBytes;
      previous_end_ = address + static_cast<uintptr_t>(s.bytes);
      if (!continues) head_end_ = s.pos + head_;
      if (s.bytes == 0 || s.pos >= head_end_) continue;  // nothing, or past its segment's head
      const uintptr_t offset = address % static_cast<uintptr_t>(kLine);
      line_ = address - offset;
      end_ = previous_end_;
      line_pos_ = s.pos - static_cast<int64_t>(offset);
      ++next_;
      return;
    }
    line_pos_ = INT64_MAX;  // the stream has ended
  }

  const StreamSpan* spans_ = nullptr;
  int64_t next_ = 0;
  int64_t stop_ = 0;
  int64_t lead_ = 0;
  int64_t head_ = 0;
  int64_t target_ = 0;          // stream position the prefetches have to reach
  // Addresses as integers: lines start up to 63 bytes before a chunk and
  // may end past its allocation, where pointer arithmetic is undefined.
  uintptr_t line_ = 0;  // next line to prefetch, in chunk next_ - 1
  uintptr_t end_ = 0;
  int64_t line_pos_ = INT64_MAX;  // stream position of line_ (none: the stream has ended)
  int64_t head_end_ = 0;        // stream position where this segment's head ends
  uintptr_t previous_end_ = UINTPTR_MAX;  // address after the last chunk looked at (none yet)
};

// Norm partial of x[0, n). With `scaled`, values are divided by `divisor`
// first (the overflow/underflow rescue pass; see NormReducer). Every
// kernel reports the bytes it reads to `prefetch`.
using NormSpanFn = NormPartial (*)(const void* x, int64_t n, NormOrder order, bool scaled, double divisor,
                                   PrefetchStream& prefetch);
// In-place update of x[0, n) by a value (a coefficient or a clamp bound).
using UpdateSpanFn = void (*)(void* x, int64_t n, double value, PrefetchStream& prefetch);

#define FASTCLIP_NORM_SPAN(name) \
  NormPartial name(const void* x, int64_t n, NormOrder order, bool scaled, double divisor, PrefetchStream& prefetch)
#define FASTCLIP_UPDATE_SPAN(name) void name(void* x, int64_t n, double value, PrefetchStream& prefetch)

// Orders 2, 1 and inf (spans.cpp).
FASTCLIP_NORM_SPAN(norm_span_f32);
FASTCLIP_NORM_SPAN(norm_span_f64);
FASTCLIP_NORM_SPAN(norm_span_f16);
FASTCLIP_NORM_SPAN(norm_span_bf16);
// A general order p (power.cpp): the power sum and max |x|.
FASTCLIP_NORM_SPAN(power_span_f32);
FASTCLIP_NORM_SPAN(power_span_f64);
FASTCLIP_NORM_SPAN(power_span_f16);
FASTCLIP_NORM_SPAN(power_span_bf16);

// x *= coef; 16-bit types compute in float and round once (torch's opmath).
FASTCLIP_UPDATE_SPAN(scale_span_f32);
FASTCLIP_UPDATE_SPAN(scale_span_f64);
FASTCLIP_UPDATE_SPAN(scale_span_f16);
FASTCLIP_UPDATE_SPAN(scale_span_bf16);

// x = clamp(x, -bound, bound); NaN stays NaN.
FASTCLIP_UPDATE_SPAN(clamp_span_f32);
FASTCLIP_UPDATE_SPAN(clamp_span_f64);
FASTCLIP_UPDATE_SPAN(clamp_span_f16);
FASTCLIP_UPDATE_SPAN(clamp_span_bf16);

inline NormSpanFn norm_fn(DType d, NormOrder order) {
  const bool general = order.kind == NormKind::kP;
  switch (d) {
    case DType::kFloat32:
      return general ? power_span_f32 : norm_span_f32;
    case DType::kFloat64:
      return general ? power_span_f64 : norm_span_f64;
    case DType::kFloat16:
      return general ? power_span_f16 : norm_span_f16;
    default:
      return general ? power_span_bf16 : norm_span_bf16;
  }
}

inline UpdateSpanFn scale_fn(DType d) {
  switch (d) {
    case DType::kFloat32:
      return scale_span_f32;
    case DType::kFloat64:
      return scale_span_f64;
    case DType::kFloat16:
      return scale_span_f16;
    default:
      return scale_span_bf16;
  }
}

inline UpdateSpanFn clamp_fn(DType d) {
  switch (d) {
    case DType::kFloat32:
      return clamp_span_f32;
    case DType::kFloat64:
      return clamp_span_f64;
    case DType::kFloat16:
      return clamp_span_f16;
    default:
      return clamp_span_bf16;
  }
}

}  // namespace cpu
}  // namespace fastclip
