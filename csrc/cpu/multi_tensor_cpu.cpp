// fastclip CPU kernels: one parallel pass over all tensors of a call.
//
// Work is the chunk list of fastclip.h (every tensor cut into pieces of at
// most kChunkElems elements), spread over ATen's intra-op threads balanced
// by element count. Each chunk writes its own partial; partials are then
// reduced in chunk order, so results are bitwise identical whatever the
// thread count. Accumulation is in double: squares of any finite float32
// are below 1.2e77 and cannot overflow, and 16-bit inputs are exact in
// float, so norms are accurate to float32 rounding for every input dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../fastclip.h"
#include "../ops.h"
#include "spans.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define FASTCLIP_MXCSR 1
#elif defined(__aarch64__) && defined(__GNUC__)
#define FASTCLIP_FPCR 1
#endif

namespace fastclip {
namespace cpu {
namespace {

// The caller's denormal mode (x86: MXCSR DAZ and FTZ; AArch64: FPCR FZ,
// inputs and results alike; torch.set_flush_denormal sets either) for the
// worker threads while they run a call's chunks. The mode belongs to each
// thread and torch sets it only on the calling one; without this a chunk
// would read subnormals as zero or not depending on which thread ran it,
// and threads take pieces in no fixed order (found on AArch64 under qemu:
// FZ had not been carried over).
class CallerDenormalMode {
#if defined(FASTCLIP_MXCSR)
  using Word = unsigned;
  static constexpr Word kBits = 0x0040u | 0x8000u;  // DAZ | FTZ
  static Word read() { return _mm_getcsr(); }
  static void write(Word w) { _mm_setcsr(w); }
#elif defined(FASTCLIP_FPCR)
  using Word = uint64_t;
  static constexpr Word kBits = Word{1} << 24;  // FZ
  static Word read() {
    Word w;
    asm volatile("mrs %0, fpcr" : "=r"(w));
    return w;
  }
  static void write(Word w) { asm volatile("msr fpcr, %0" : : "r"(w)); }
#else
  using Word = unsigned;
  static constexpr Word kBits = 0;  // no mode known to carry over
  static Word read() { return 0; }
  static void write(Word) {}
#endif

 public:
  CallerDenormalMode() : caller_(read() & kBits) {}
  // Applies the caller's mode on this thread until the returned guard ends.
  struct Guard {
    explicit Guard(Word mode) : saved(read()) { write((saved & ~kBits) | mode); }
    ~Guard() { write(saved); }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    Word saved;
  };
  Guard apply() const { return Guard(caller_); }

 private:
  Word caller_;
};

// 64 Ki elements (256 KiB of float32) per chunk: large enough that the
// per-chunk overhead vanishes, small enough that a big tensor splits
// evenly over threads and a chunk stays within the 1-2 MiB L2 of a core.
constexpr int64_t kChunkElems = int64_t{1} << 16;

// Below this many elements in a call, threads cost more than they save.
constexpr int64_t kMinParallelElems = int64_t{1} << 15;

// Work pieces taken by threads from a shared counter: enough per thread
// that the last one is short, each at least a chunk's worth of elements.
constexpr int64_t kPiecesPerThread = 32;
constexpr int64_t kMinPieceElems = kChunkElems;

// How far the software prefetcher runs ahead of the kernels (see
// PrefetchStream). A C++ model of 10,000 gradients with 4 KiB between
// them, one thread, fp32 norm: 2 KiB ahead 7.0 ms, 4 KiB 5.1, 8 KiB 4.1,
// 16 KiB 4.0, against 9.1 without and 2.6 for the same bytes back to back
// (where it cost nothing measurable). Through the ops, 2 threads, the
// benchmark's interleaved list, fp32 norm, three rounds: 4 KiB 6.6-7.0 ms,
// 8 KiB 6.2-7.3, 16 KiB 5.2-5.8, 32 KiB 5.7-6.3, 64 KiB 5.6-5.8, none
// 8.0-9.5. The lead stays well inside L2.
constexpr int64_t kPrefetchLeadBytes = int64_t{16} << 10;
// How much of each segment of adjacent chunks the software prefetcher
// covers before it leaves the stream to the hardware (see PrefetchStream):
// the first 16 KiB, or all of it. Which is faster depends on the machine's
// hardware prefetchers. Measured, one 256 MB buffer, one thread: on an AMD
// Zen 4 VM all of it read 13-18% slower; on an Intel Xeon VM the hardware
// fell behind past the head, and all of it read 1.2-1.5x faster (fp32 norm
// 45.8 -> 36.2 ms, bf16 norm 52.7 -> 35.2, bf16 scale 55.5 -> 39.1, as
// fast as torch's sum of the same bytes); on an AMD Zen 3 VM (two threads,
// the benchmark's GPT-2, ResNet-50 and 1 GB lists, fp32 and bf16) all of it
// brought the norm and the clip closer to the floor in 30 of 36 alternating
// pairs, by up to 26% (README). So all
// of it on x86 CPUs but AMD's with AVX-512 (Zen 4 and later), the head
// elsewhere (AMD's Zen 4 and later, other architectures: unmeasured but
// for Zen 4); FASTCLIP_CPU_PREFETCH=heads|all overrides (prefetch_choice).
constexpr int64_t kPrefetchHeadBytes = int64_t{16} << 10;
constexpr const char* kPrefetchEnv = "FASTCLIP_CPU_PREFETCH";

bool whole_segments_by_cpu() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return true;
  // AMD's first cores with AVX-512 (Zen 4) have the prefetchers that keep up.
  return __builtin_cpu_is("amd") && !__builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}


// ----------------------------------------------------------- the driver
// The work of one pass over a table: its chunks, where each starts in
// element count (for cutting pieces) and in bytes (for the prefetcher).
// Built once per table and chunk plan; the clip's two passes share it.
struct Work {
  Work(const std::vector<TensorDesc>& table_descs, std::vector<Chunk> planned)
      : descs(table_descs), chunks(std::move(planned)), start(chunks.size()), spans(chunks.size()) {
    int64_t pos = 0;
    for (size_t c = 0; c < chunks.size(); ++c) {
      const Chunk& ch = chunks[c];
      const TensorDesc& d = descs[static_cast<size_t>(ch.tensor)];
      const int64_t size = dtype_size(d.dtype);
      start[c] = total;
      spans[c] = StreamSpan{static_cast<char*>(d.data) + ch.begin * size, ch.size * size, pos};
      total += ch.size;
      pos += ch.size * size;
    }
  }
  const std::vector<TensorDesc>& descs;
  std::vector<Chunk> chunks;
  std::vector<int64_t> start;     // elements of the chunks before each
  std::vector<StreamSpan> spans;  // each chunk's bytes and stream position
  int64_t total = 0;              // elements in all chunks
};

// Runs fn(data, c, prefetch) for every chunk index c of `work`, each exactly once, on ATen's
// threads. The chunks are cut into pieces of about equal element counts
// (chunks that start in a piece's element range belong to it, so a few
// large tensors among many small ones still balance), and each thread
// takes the next piece from a shared counter until none is left: on a
// shared machine one core is often slower than the other, and a static
// halving left the faster one waiting (10,000 tensors, fp32: 4.0 against
// 4.5 ms per thread; paired runs of the benchmark sets: clip 0-15% faster,
// norm 8% faster to 3% slower, within the noise).
//
// Each thread's run of chunks is prefetched ahead of its kernels by a
// PrefetchStream: a model's gradients are separate allocations with other
// memory (their parameters) between them, and the hardware prefetchers,
// which follow one address stream, lose the stream at every gradient
// (10,000 gradients between their parameters, 2 threads, against the
// previous design, which prefetched the first 4 KiB of the next chunk:
// norm 6.41 -> 4.82-5.00 ms fp32, 4.72 -> 3.56-3.67 ms bf16). Walking a
// clip's scale pass backward, to start where the norm pass left the caches
// warm, measured 3% faster to 7% slower in paired runs on the development
// VM (whose L3 is shared with other tenants), so it is not done.
//
// `in_order`: one thread runs every chunk in list order (writes to spans
// that share bytes; see TensorTable::spans_overlap).
template <typename Fn>
void for_each_chunk(const Work& work, const Fn& fn, bool in_order = false) {
  const int64_t count = static_cast<int64_t>(work.chunks.size());
  const int64_t total = work.total;
  const std::vector<int64_t>& start = work.start;
  const std::vector<StreamSpan>& spans = work.spans;
  const int64_t head = prefetch_choice().head_bytes;
  // Chunks [first, stop), prefetched ahead as one stream.
  auto run = [&](int64_t first, int64_t stop) {
    PrefetchStream prefetch(spans.data(), first, stop, kPrefetchLeadBytes, head);
    for (int64_t c = first; c < stop; ++c) {
      prefetch.start_span(c);
      fn(spans[static_cast<size_t>(c)].data, c, prefetch);
    }
  };
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t piece = std::max(kMinPieceElems, (total + threads * kPiecesPerThread - 1) / (threads * kPiecesPerThread));
  const int64_t pieces = (total + piece - 1) / piece;
  // No more threads than pieces: waking idle threads costs more than a
  // small call's work.
  const int64_t workers = std::min(threads, pieces);
  if (in_order || total < kMinParallelElems || workers <= 1 || host_runs_serially()) {
    run(0, count);
    return;
  }
  std::atomic<int64_t> next_piece{0};
  const CallerDenormalMode mode;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    [[maybe_unused]] const auto guard = mode.apply();
    for (int64_t p = next_piece.fetch_add(1, std::memory_order_relaxed); p < pieces;
         p = next_piece.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t first = std::lower_bound(start.begin(), start.end(), p * piece) - start.begin();
      const int64_t stop = std::lower_bound(start.begin(), start.end(), std::min(total, (p + 1) * piece)) - start.begin();
      run(first, stop);
    }
  });
}

// Norm of every tensor and of all of them, with the rescue pass for power
// sums that left the double range.
NormReducer compute_norms(const Work& work, NormOrder order) {
  const std::vector<TensorDesc>& descs = work.descs;
  const std::vector<Chunk>& chunks = work.chunks;
  std::vector<NormPartial> partials(chunks.size());
  for_each_chunk(work, [&](char* data, int64_t c, PrefetchStream& prefetch) {
    const Chunk& ch = chunks[static_cast<size_t>(c)];
    const DType dtype = descs[static_cast<size_t>(ch.tensor)].dtype;
    partials[static_cast<size_t>(c)] = norm_fn(dtype, order)(data, ch.size, order, false, 1.0, prefetch);
  });
  NormReducer reducer(order, static_cast<int64_t>(descs.size()));
  reducer.reduce(chunks, partials);

  bool tracks_max = order.kind == NormKind::kP;
  for (const TensorDesc& d : descs) tracks_max = tracks_max || d.dtype == DType::kFloat64;
  const std::vector<int64_t> rescue = reducer.tensors_to_rescue(tracks_max);
  if (!rescue.empty()) {
    std::vector<char> marked(descs.size(), 0);
    for (int64_t t : rescue) marked[static_cast<size_t>(t)] = 1;
    std::vector<Chunk> again;
    for (const Chunk& ch : chunks)
      if (marked[static_cast<size_t>(ch.tensor)]) again.push_back(ch);
    const Work again_work(descs, std::move(again));
    std::vector<NormPartial> again_partials(again_work.chunks.size());
    for_each_chunk(again_work, [&](char* data, int64_t c, PrefetchStream& prefetch) {
      const Chunk& ch = again_work.chunks[static_cast<size_t>(c)];
      const DType dtype = descs[static_cast<size_t>(ch.tensor)].dtype;
      again_partials[static_cast<size_t>(c)] =
          norm_fn(dtype, order)(data, ch.size, order, true, reducer.scale(ch.tensor), prefetch);
    });
    reducer.reduce(again_work.chunks, again_partials);
  }
  return reducer;
}

// Whether a write pass over `table` must run in list order: only where it
// would run on several threads and two spans share bytes (the same tensor
// twice in a list scales it twice, as torch's loop does, and never with
// two threads on the same elements at once).
bool write_in_order(const TensorTable& table, const Work& work) {
  if (host_runs_serially()) return false;
  return work.total >= kMinParallelElems && table.spans_overlap();
}

// `work` is over `table`'s descriptors.
void update_all(const TensorTable& table, const Work& work, UpdateSpanFn (*pick)(DType), double value) {
  for_each_chunk(
      work,
      [&](char* data, int64_t c, PrefetchStream& prefetch) {
        const Chunk& ch = work.chunks[static_cast<size_t>(c)];
        pick(work.descs[static_cast<size_t>(ch.tensor)].dtype)(data, ch.size, value, prefetch);
      },
      write_in_order(table, work));
}

// One tensor updated alone. A view with gaps is updated through a
// contiguous copy by the same span kernels and copied back: ATen's
// mul_/clamp_ would run on ATen's threads, which do not have the caller's
// denormal mode (found in review: under flush-denormal half of a gapped
// view's subnormals were kept), and a copy does no arithmetic.
void update_one(const at::Tensor& t, UpdateSpanFn (*pick)(DType), double value) {
  const bool gaps = !t.is_non_overlapping_and_dense();
  const at::Tensor data = gaps ? t.contiguous() : t;
  const TensorTable one(data, TensorTable::kWrite);
  update_all(one, Work(one.descs(), plan_chunks(one.descs(), kChunkElems)), pick, value);
  if (gaps) t.copy_(data);
}

// In-place update of a list by a host value: the entries without gaps in
// one parallel pass, then each view with gaps in list order.
void update_tensors(at::TensorList tensors, UpdateSpanFn (*pick)(DType), double value) {
  const TensorTable table(tensors, TensorTable::kWrite);
  if (table.gaps_reach_dense(tensors)) {
    for (const at::Tensor& t : tensors) {
      if (t.numel() > 0) update_one(t, pick, value);
    }
  } else {
    update_all(table, Work(table.descs(), plan_chunks(table.descs(), kChunkElems)), pick, value);
    for (int64_t i : table.strided()) update_one(tensors[static_cast<size_t>(i)], pick, value);
  }
  bump_versions(tensors);
}

// In-place scale of a list by a host value.
void scale_tensors(at::TensorList tensors, double coef) {
  if (coef == 1.0) return;  // the contract: no memory traffic at all
  update_tensors(tensors, scale_fn, coef);
}

at::Tensor scalar_float(double v) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(v);
  return out;
}

at::Tensor scalar_double(double v) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  *out.data_ptr<double>() = v;
  return out;
}

// ------------------------------------------------------------ the ops
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList tensors, double ord, bool per_tensor,
                                                         bool fp64, int64_t slices) {
  constexpr const char* kOp = "fastclip::multi_tensor_norm";
  const TensorTable table = [&] {
    if (slices == 1) {  // the tensors' checks and the table in one walk
      return TensorTable(kOp, tensors, c10::DeviceType::CPU, TensorTable::kRead, false,
                         [&] { check_norm_order(kOp, ord); });
    }
    check_tensors(kOp, tensors, c10::DeviceType::CPU);
    check_norm_order(kOp, ord);
    check_slices(kOp, tensors, slices);
    return TensorTable(tensors, slices);
  }();
  const NormReducer norms =
      compute_norms(Work(table.descs(), plan_chunks(table.descs(), kChunkElems)), make_norm_order(ord));
  const int64_t n = static_cast<int64_t>(table.descs().size());
  at::Tensor each = at::empty({per_tensor ? n : 0}, at::TensorOptions().dtype(fp64 ? at::kDouble : at::kFloat));
  if (per_tensor && fp64) {
    double* out = each.data_ptr<double>();
    for (int64_t t = 0; t < n; ++t) out[t] = norms.tensor_norm(t);
  } else if (per_tensor) {
    float* out = each.data_ptr<float>();
    for (int64_t t = 0; t < n; ++t) out[t] = static_cast<float>(norms.tensor_norm(t));
  }
  const double total = norms.total_norm();
  return {fp64 ? scalar_double(total) : scalar_float(total), each};
}

void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& coef) {
  constexpr const char* kOp = "fastclip::multi_tensor_scale_";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_writable(kOp, tensors);
  check_coef(kOp, coef, c10::Device(c10::DeviceType::CPU));
  scale_tensors(tensors, coef.item<double>());
}

void multi_tensor_clamp_cpu(at::TensorList tensors, double clip_value) {
  constexpr const char* kOp = "fastclip::multi_tensor_clamp_";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_writable(kOp, tensors);
  check_clip_value(kOp, clip_value);
  if (std::isinf(clip_value)) return;  // clamping to +-inf changes nothing
  update_tensors(tensors, clamp_fn, clip_value);
}

at::Tensor clip_cpu(at::TensorList tensors, double max_norm, double ord, bool error_if_nonfinite) {
  constexpr const char* kOp = "fastclip::clip_";
  const TensorTable table(kOp, tensors, c10::DeviceType::CPU, TensorTable::kRead, true, [&] {
    check_max_norm(kOp, max_norm);
    check_norm_order(kOp, ord);
  });
  const Work work(table.descs(), plan_chunks(table.descs(), kChunkElems));
  const double total = compute_norms(work, make_norm_order(ord)).total_norm();
  if (error_if_nonfinite) check_norm_finite(total, ord);
  // The coefficient comes from the double norm: it stays right even when
  // the norm itself is beyond float32 range.
  const double coef = clip_coefficient(max_norm, total);
  if (coef == 1.0) return scalar_float(total);  // the contract: no memory traffic at all
  if (table.in_place()) {
    // Every tensor was read in place: the same table and Work serve the
    // scale pass (the common case; no second walk over the tensors).
    update_all(table, work, scale_fn, coef);
    bump_versions(tensors);
  } else {
    scale_tensors(tensors, coef);
  }
  return scalar_float(total);
}

// The value of a one-element tensor of a supported dtype (checked), read
// directly: item() would go through the dispatcher for each.
double read_scalar(const at::Tensor& t) {
  const void* p = t.const_data_ptr();
  switch (to_dtype(t.scalar_type())) {
    case DType::kFloat32:
      return *static_cast<const float*>(p);
    case DType::kFloat64:
      return *static_cast<const double*>(p);
    case DType::kFloat16:
      return half_to_float(*static_cast<const uint16_t*>(p));
    default:
      return bf16_to_float(*static_cast<const uint16_t*>(p));
  }
}

double read_or(const std::optional<at::Tensor>& t, double absent) { return t.has_value() ? read_scalar(*t) : absent; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_scalars_cpu(
    const at::Tensor& norm, double max_norm, const std::optional<at::Tensor>& loss_scale,
    const std::optional<at::Tensor>& extra_scale, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& extra_found, bool skip_inf_divisor, const at::Tensor& last_norm,
    const at::Tensor& last_coef, const at::Tensor& skipped, bool count_skip) {
  constexpr const char* kOp = "fastclip::clip_scalars_";
  check_clip_scalars(kOp, norm, max_norm, loss_scale, extra_scale, found_inf, extra_found, last_norm, last_coef,
                     skipped, c10::DeviceType::CPU);
  const bool found_in = read_or(found_inf, 0.0) > 0.0 || read_or(extra_found, 0.0) > 0.0;
  const StepScalars s = step_scalars(read_scalar(norm), max_norm, read_or(loss_scale, 1.0), read_or(extra_scale, 1.0),
                                     found_in, skip_inf_divisor);
  *last_norm.data_ptr<float>() = static_cast<float>(s.norm);
  *last_coef.data_ptr<float>() = static_cast<float>(s.coef);
  if (count_skip) *skipped.data_ptr<int64_t>() += s.found ? 1 : 0;
  bump_clip_scalars(last_norm, last_coef, skipped, count_skip);
  return {scalar_double(s.factor), scalar_float(s.divisor), scalar_float(s.found ? 1.0 : 0.0)};
}

}  // namespace

PrefetchChoice prefetch_choice() {
  static const PrefetchChoice choice = [] {
    const char* value = std::getenv(kPrefetchEnv);
    const std::string mode = value == nullptr ? "" : value;
    std::string decided_by = kPrefetchEnv;
    bool whole = mode == "all";
    if (mode != "all" && mode != "heads") {
      // A speed hint: a bad value is ignored with a warning, never an
      // error (one raised by a later part of a split-path call would come
      // after earlier parts were written; found in review).
      whole = whole_segments_by_cpu();
      decided_by = "CPU model";
      if (!mode.empty()) {
        TORCH_WARN(kPrefetchEnv, "='", mode, "' is neither 'all' nor 'heads'; ignored (the CPU's model decides)");
        decided_by += std::string(" (") + kPrefetchEnv + "='" + mode + "' ignored)";
      }
    }
    return PrefetchChoice{whole, whole ? PrefetchStream::kWholeSegments : kPrefetchHeadBytes, decided_by};
  }();
  return choice;
}

}  // namespace cpu
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("multi_tensor_norm", &fastclip::cpu::multi_tensor_norm_cpu);
  m.impl("multi_tensor_scale_", &fastclip::cpu::multi_tensor_scale_cpu);
  m.impl("multi_tensor_clamp_", &fastclip::cpu::multi_tensor_clamp_cpu);
  m.impl("clip_", &fastclip::cpu::clip_cpu);
  m.impl("clip_scalars_", &fastclip::cpu::clip_scalars_cpu);
}
