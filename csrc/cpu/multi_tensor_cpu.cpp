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
#include <cmath>
#include <type_traits>
#include <vector>

#include "../fastclip.h"
#include "../ops.h"

// Hot loops are compiled for several x86 ISA levels and picked at load time
// (GCC function multi-versioning): the baseline x86-64 build of a wheel
// would otherwise leave AVX2/AVX-512 and F16C unused.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FASTCLIP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCLIP_CPU_CLONES
#endif
#define FASTCLIP_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastclip {
namespace cpu {
namespace {

// 64 Ki elements (256 KiB of float32) per chunk: large enough that the
// per-chunk overhead vanishes, small enough that a big tensor splits
// evenly over threads and a chunk stays within the 1-2 MiB L2 of a core.
constexpr int64_t kChunkElems = int64_t{1} << 16;

// Below this many elements in a call, threads cost more than they save.
constexpr int64_t kMinParallelElems = int64_t{1} << 15;

// Independent accumulators per span: they hide floating-point add latency
// and let the compiler vectorize without reassociating (bitwise-stable
// results). 32 doubles are four AVX-512 or eight AVX2 registers.
constexpr int kLanes = 32;

// Element types: storage type, and how an element reads as a real number.
struct F32 {
  using storage = float;
  using compute = float;
  static FASTCLIP_ALWAYS_INLINE float load(const float* p, int64_t i) { return p[i]; }
  static FASTCLIP_ALWAYS_INLINE float store(float v) { return v; }
};
struct F64 {
  using storage = double;
  using compute = double;
  static FASTCLIP_ALWAYS_INLINE double load(const double* p, int64_t i) { return p[i]; }
  static FASTCLIP_ALWAYS_INLINE double store(double v) { return v; }
};
struct F16 {
  using storage = uint16_t;
  using compute = float;
  static FASTCLIP_ALWAYS_INLINE float load(const uint16_t* p, int64_t i) { return half_to_float(p[i]); }
  static FASTCLIP_ALWAYS_INLINE uint16_t store(float v) { return float_to_half(v); }
};
struct BF16 {
  using storage = uint16_t;
  using compute = float;
  static FASTCLIP_ALWAYS_INLINE float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  static FASTCLIP_ALWAYS_INLINE uint16_t store(float v) { return float_to_bf16(v); }
};

// ----------------------------------------------------------------- norm
// kScaled: the rescue pass, values multiplied by 2^-scale_exp first.
template <typename E, NormKind K, bool kScaled>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span_impl(const typename E::storage* x, int64_t n, double p,
                                                  int scale_exp) {
  // max |x| is only needed where a rescue can happen (see numerics.h).
  constexpr bool kTrackMax = K != NormKind::kInf && (K == NormKind::kP || std::is_same<E, F64>::value);
  double acc[kLanes];
  double amax[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = amax[l] = 0.0;

  auto step = [&](int l, int64_t i) __attribute__((always_inline)) {
    double v = static_cast<double>(E::load(x, i));
    if (kScaled) v = std::ldexp(v, -scale_exp);
    if (K == NormKind::kTwo) {
      acc[l] += v * v;
    } else {
      v = std::fabs(v);
      if (K == NormKind::kOne) acc[l] += v;
      if (K == NormKind::kP) acc[l] += std::pow(v, p);
      if (K == NormKind::kInf) acc[l] = nan_max(acc[l], v);
    }
    if (kTrackMax) amax[l] = nan_max(amax[l], std::fabs(v));
  };

  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) step(l, i + l);
  }
  for (int l = 0; i < n; ++i, ++l) step(l, i);

  const NormOrder order{K, p};
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      acc[l] = combine_acc(order, acc[l], acc[l + width]);
      amax[l] = nan_max(amax[l], amax[l + width]);
    }
  }
  return NormPartial{acc[0], kTrackMax ? amax[0] : 0.0};
}

template <typename E, bool kScaled>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span_order(const typename E::storage* x, int64_t n, NormOrder order,
                                                   int scale_exp) {
  switch (order.kind) {
    case NormKind::kTwo:
      return norm_span_impl<E, NormKind::kTwo, kScaled>(x, n, order.p, scale_exp);
    case NormKind::kOne:
      return norm_span_impl<E, NormKind::kOne, kScaled>(x, n, order.p, scale_exp);
    case NormKind::kInf:
      return norm_span_impl<E, NormKind::kInf, kScaled>(x, n, order.p, scale_exp);
    default:
      return norm_span_impl<E, NormKind::kP, kScaled>(x, n, order.p, scale_exp);
  }
}

template <typename E>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span(const void* data, int64_t n, NormOrder order, bool scaled,
                                             int scale_exp) {
  const auto* x = static_cast<const typename E::storage*>(data);
  return scaled ? norm_span_order<E, true>(x, n, order, scale_exp)
                : norm_span_order<E, false>(x, n, order, scale_exp);
}

FASTCLIP_CPU_CLONES NormPartial norm_span_f32(const void* x, int64_t n, NormOrder o, bool s, int e) {
  return norm_span<F32>(x, n, o, s, e);
}
FASTCLIP_CPU_CLONES NormPartial norm_span_f64(const void* x, int64_t n, NormOrder o, bool s, int e) {
  return norm_span<F64>(x, n, o, s, e);
}
FASTCLIP_CPU_CLONES NormPartial norm_span_f16(const void* x, int64_t n, NormOrder o, bool s, int e) {
  return norm_span<F16>(x, n, o, s, e);
}
FASTCLIP_CPU_CLONES NormPartial norm_span_bf16(const void* x, int64_t n, NormOrder o, bool s, int e) {
  return norm_span<BF16>(x, n, o, s, e);
}

// ---------------------------------------------------------- scale, clamp
// 16-bit types compute in float and round once, as torch's opmath does.
template <typename E>
FASTCLIP_ALWAYS_INLINE void scale_span(void* data, int64_t n, double coef) {
  auto* x = static_cast<typename E::storage*>(data);
  const auto c = static_cast<typename E::compute>(coef);
  for (int64_t i = 0; i < n; ++i) x[i] = E::store(E::load(x, i) * c);
}

// NaN compares false both ways and is kept, as torch.clamp keeps it.
template <typename E>
FASTCLIP_ALWAYS_INLINE void clamp_span(void* data, int64_t n, double bound) {
  auto* x = static_cast<typename E::storage*>(data);
  const auto hi = static_cast<typename E::compute>(bound);
  const auto lo = -hi;
  for (int64_t i = 0; i < n; ++i) {
    auto v = E::load(x, i);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    x[i] = E::store(v);
  }
}

FASTCLIP_CPU_CLONES void scale_span_f32(void* x, int64_t n, double c) { scale_span<F32>(x, n, c); }
FASTCLIP_CPU_CLONES void scale_span_f64(void* x, int64_t n, double c) { scale_span<F64>(x, n, c); }
FASTCLIP_CPU_CLONES void scale_span_f16(void* x, int64_t n, double c) { scale_span<F16>(x, n, c); }
FASTCLIP_CPU_CLONES void scale_span_bf16(void* x, int64_t n, double c) { scale_span<BF16>(x, n, c); }
FASTCLIP_CPU_CLONES void clamp_span_f32(void* x, int64_t n, double v) { clamp_span<F32>(x, n, v); }
FASTCLIP_CPU_CLONES void clamp_span_f64(void* x, int64_t n, double v) { clamp_span<F64>(x, n, v); }
FASTCLIP_CPU_CLONES void clamp_span_f16(void* x, int64_t n, double v) { clamp_span<F16>(x, n, v); }
FASTCLIP_CPU_CLONES void clamp_span_bf16(void* x, int64_t n, double v) { clamp_span<BF16>(x, n, v); }

using NormSpanFn = NormPartial (*)(const void*, int64_t, NormOrder, bool, int);
using UpdateSpanFn = void (*)(void*, int64_t, double);

NormSpanFn norm_fn(DType d) {
  switch (d) {
    case DType::kFloat32:
      return norm_span_f32;
    case DType::kFloat64:
      return norm_span_f64;
    case DType::kFloat16:
      return norm_span_f16;
    default:
      return norm_span_bf16;
  }
}

UpdateSpanFn scale_fn(DType d) {
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

UpdateSpanFn clamp_fn(DType d) {
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

// ----------------------------------------------------------- the driver
// Runs fn(c) for every chunk index, each exactly once, on ATen's threads.
// at::parallel_for cuts its range into equal contiguous pieces, so the
// range is elements, not chunks: a thread takes the chunks that start in
// its piece, and a few large tensors among many small ones still balance.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  const int64_t count = static_cast<int64_t>(chunks.size());
  std::vector<int64_t> start(chunks.size());
  int64_t total = 0;
  for (int64_t c = 0; c < count; ++c) {
    start[static_cast<size_t>(c)] = total;
    total += chunks[static_cast<size_t>(c)].size;
  }
  at::parallel_for(0, total, kMinParallelElems, [&](int64_t begin, int64_t end) {
    const auto first = std::lower_bound(start.begin(), start.end(), begin) - start.begin();
    for (int64_t c = first; c < count && start[static_cast<size_t>(c)] < end; ++c) fn(c);
  });
}

// Norm of every tensor and of all of them, with the rescue pass for power
// sums that left the double range.
NormReducer compute_norms(const std::vector<TensorDesc>& descs, NormOrder order) {
  const std::vector<Chunk> chunks = plan_chunks(descs, kChunkElems);
  std::vector<NormPartial> partials(chunks.size());
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[static_cast<size_t>(c)];
    const TensorDesc& d = descs[static_cast<size_t>(ch.tensor)];
    partials[static_cast<size_t>(c)] =
        norm_fn(d.dtype)(static_cast<const char*>(d.data) + ch.begin * dtype_size(d.dtype), ch.size, order, false, 0);
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
    std::vector<NormPartial> again_partials(again.size());
    for_each_chunk(again, [&](int64_t c) {
      const Chunk& ch = again[static_cast<size_t>(c)];
      const TensorDesc& d = descs[static_cast<size_t>(ch.tensor)];
      again_partials[static_cast<size_t>(c)] =
          norm_fn(d.dtype)(static_cast<const char*>(d.data) + ch.begin * dtype_size(d.dtype), ch.size, order,
                           true, reducer.exponent(ch.tensor));
    });
    reducer.reduce(again, again_partials);
  }
  return reducer;
}

void update_all(const std::vector<TensorDesc>& descs, UpdateSpanFn (*pick)(DType), double value) {
  const std::vector<Chunk> chunks = plan_chunks(descs, kChunkElems);
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[static_cast<size_t>(c)];
    const TensorDesc& d = descs[static_cast<size_t>(ch.tensor)];
    pick(d.dtype)(static_cast<char*>(d.data) + ch.begin * dtype_size(d.dtype), ch.size, value);
  });
}

// In-place scale of a list by a host value; views with gaps go to ATen.
void scale_tensors(at::TensorList tensors, double coef) {
  if (coef == 1.0) return;  // the contract: no memory traffic at all
  const TensorTable table(tensors, TensorTable::kWrite);
  update_all(table.descs(), scale_fn, coef);
  for (int64_t i : table.strided()) tensors[static_cast<size_t>(i)].mul_(coef);
}

at::Tensor scalar_float(double v) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(v);
  return out;
}

// ------------------------------------------------------------ the ops
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList tensors, double ord, bool per_tensor) {
  constexpr const char* kOp = "fastclip::multi_tensor_norm";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_norm_order(kOp, ord);
  const TensorTable table(tensors, TensorTable::kRead);
  const NormReducer norms = compute_norms(table.descs(), make_norm_order(ord));
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor each = at::empty({per_tensor ? n : 0}, at::TensorOptions().dtype(at::kFloat));
  if (per_tensor) {
    float* out = each.data_ptr<float>();
    for (int64_t t = 0; t < n; ++t) out[t] = static_cast<float>(norms.tensor_norm(t));
  }
  return {scalar_float(norms.total_norm()), each};
}

void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& coef) {
  constexpr const char* kOp = "fastclip::multi_tensor_scale_";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_coef(kOp, coef, c10::Device(c10::DeviceType::CPU));
  scale_tensors(tensors, coef.item<double>());
}

void multi_tensor_clamp_cpu(at::TensorList tensors, double clip_value) {
  constexpr const char* kOp = "fastclip::multi_tensor_clamp_";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_clip_value(kOp, clip_value);
  if (std::isinf(clip_value)) return;  // clamping to +-inf changes nothing
  const TensorTable table(tensors, TensorTable::kWrite);
  update_all(table.descs(), clamp_fn, clip_value);
  for (int64_t i : table.strided()) tensors[static_cast<size_t>(i)].clamp_(-clip_value, clip_value);
}

at::Tensor clip_cpu(at::TensorList tensors, double max_norm, double ord) {
  constexpr const char* kOp = "fastclip::clip_";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_max_norm(kOp, max_norm);
  check_norm_order(kOp, ord);
  double total = 0.0;
  {
    const TensorTable table(tensors, TensorTable::kRead);
    total = compute_norms(table.descs(), make_norm_order(ord)).total_norm();
  }
  // The coefficient comes from the double norm: it stays right even when
  // the norm itself is beyond float32 range.
  scale_tensors(tensors, clip_coefficient(max_norm, total));
  return scalar_float(total);
}

}  // namespace
}  // namespace cpu
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("multi_tensor_norm", &fastclip::cpu::multi_tensor_norm_cpu);
  m.impl("multi_tensor_scale_", &fastclip::cpu::multi_tensor_scale_cpu);
  m.impl("multi_tensor_clamp_", &fastclip::cpu::multi_tensor_clamp_cpu);
  m.impl("clip_", &fastclip::cpu::clip_cpu);
}
