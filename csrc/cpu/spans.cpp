// fastclip CPU span kernels: the per-chunk loops, free of ATen.
//
// Each function processes one contiguous span of one dtype. They are
// plain loops over kLanes independent accumulators, which GCC vectorizes
// for each ISA level of FASTCLIP_CPU_CLONES without reassociating
// floating-point sums, so results are bitwise reproducible.
#include "spans.h"

#include <cmath>
#include <cstdint>
#include <type_traits>


// Hot loops are compiled for several x86 ISA levels and picked at load time
// (GCC function multi-versioning): the baseline x86-64 build of a wheel
// would otherwise leave AVX2/AVX-512 unused.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FASTCLIP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCLIP_CPU_CLONES
#endif
#define FASTCLIP_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastclip {
namespace cpu {
namespace {

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
// kScaled: the rescue pass, values divided by `divisor` first.
// max that keeps NaN: once a lane holds NaN, no comparison replaces it.
// Bitwise | instead of || keeps the loop free of branches (vectorizable).
template <typename T>
FASTCLIP_ALWAYS_INLINE T max_keep_nan(T m, T v) {
  return ((v > m) | (v != v)) ? v : m;
}

template <typename E, NormKind K, bool kScaled>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span_impl(const typename E::storage* x, int64_t n, double p,
                                                  double divisor) {
  using T = typename E::compute;
  // max |x| is only needed where a rescue can happen (see numerics.h); it
  // and the inf-norm are exact in the element's own compute type.
  constexpr bool kTrackMax = K != NormKind::kInf && (K == NormKind::kP || std::is_same<E, F64>::value);
  double acc[kLanes];
  T amax[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    acc[l] = 0.0;
    amax[l] = T(0);
  }

  auto step = [&](int l, int64_t i) __attribute__((always_inline)) {
    const T raw = E::load(x, i);
    if (K == NormKind::kInf || kTrackMax) amax[l] = max_keep_nan(amax[l], std::fabs(raw));
    if (K == NormKind::kInf) return;
    double v = static_cast<double>(raw);
    if (kScaled) v /= divisor;
    if (K == NormKind::kTwo) acc[l] += v * v;
    if (K == NormKind::kOne) acc[l] += std::fabs(v);
    if (K == NormKind::kP) acc[l] += std::pow(std::fabs(v), p);
  };

  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) step(l, i + l);
  }
  for (int l = 0; i < n; ++i, ++l) step(l, i);

  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      acc[l] += acc[l + width];
      amax[l] = max_keep_nan(amax[l], amax[l + width]);
    }
  }
  const double top = static_cast<double>(amax[0]);
  return K == NormKind::kInf ? NormPartial{top, 0.0} : NormPartial{acc[0], kTrackMax ? top : 0.0};
}

template <typename E, bool kScaled>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span_order(const typename E::storage* x, int64_t n, NormOrder order,
                                                   double divisor) {
  switch (order.kind) {
    case NormKind::kTwo:
      return norm_span_impl<E, NormKind::kTwo, kScaled>(x, n, order.p, divisor);
    case NormKind::kOne:
      return norm_span_impl<E, NormKind::kOne, kScaled>(x, n, order.p, divisor);
    case NormKind::kInf:
      return norm_span_impl<E, NormKind::kInf, kScaled>(x, n, order.p, divisor);
    default:
      return norm_span_impl<E, NormKind::kP, kScaled>(x, n, order.p, divisor);
  }
}

template <typename E>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span(const void* data, int64_t n, NormOrder order, bool scaled,
                                             double divisor) {
  const auto* x = static_cast<const typename E::storage*>(data);
  return scaled ? norm_span_order<E, true>(x, n, order, divisor)
                : norm_span_order<E, false>(x, n, order, divisor);
}

// ---------------------------------------------------------- scale, clamp
template <typename E, typename Op>
FASTCLIP_ALWAYS_INLINE void update_span(void* data, int64_t n, const Op& op) {
  auto* x = static_cast<typename E::storage*>(data);
  for (int64_t i = 0; i < n; ++i) x[i] = E::store(op(E::load(x, i)));
}

// 16-bit types compute in float and round once, as torch's opmath does.
template <typename E>
FASTCLIP_ALWAYS_INLINE void scale_span(void* data, int64_t n, double coef) {
  using T = typename E::compute;
  const T c = static_cast<T>(coef);
  update_span<E>(data, n, [c](T v) __attribute__((always_inline)) { return v * c; });
}

// NaN compares false both ways and is kept, as torch.clamp keeps it.
template <typename E>
FASTCLIP_ALWAYS_INLINE void clamp_span(void* data, int64_t n, double bound) {
  using T = typename E::compute;
  const T hi = static_cast<T>(bound);
  const T lo = -hi;
  update_span<E>(data, n, [lo, hi](T v) __attribute__((always_inline)) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
  });
}

}  // namespace

void prefetch_bytes(const void* x, int64_t bytes) {
  constexpr int64_t kCacheLine = 64;
  constexpr int kRead = 0;
  constexpr int kLocalityL2 = 1;  // prefetcht2 on x86
  const char* p = static_cast<const char*>(x);
  for (int64_t offset = 0; offset < bytes; offset += kCacheLine) __builtin_prefetch(p + offset, kRead, kLocalityL2);
}

FASTCLIP_CPU_CLONES NormPartial norm_span_f32(const void* x, int64_t n, NormOrder o, bool s, double d) {
  return norm_span<F32>(x, n, o, s, d);
}
FASTCLIP_CPU_CLONES NormPartial norm_span_f64(const void* x, int64_t n, NormOrder o, bool s, double d) {
  return norm_span<F64>(x, n, o, s, d);
}
FASTCLIP_CPU_CLONES NormPartial norm_span_bf16(const void* x, int64_t n, NormOrder o, bool s, double d) {
  return norm_span<BF16>(x, n, o, s, d);
}
FASTCLIP_CPU_CLONES NormPartial norm_span_f16(const void* x, int64_t n, NormOrder o, bool s, double d) {
  return norm_span<F16>(x, n, o, s, d);
}

FASTCLIP_CPU_CLONES void scale_span_f32(void* x, int64_t n, double c) { scale_span<F32>(x, n, c); }
FASTCLIP_CPU_CLONES void scale_span_f64(void* x, int64_t n, double c) { scale_span<F64>(x, n, c); }
FASTCLIP_CPU_CLONES void scale_span_bf16(void* x, int64_t n, double c) { scale_span<BF16>(x, n, c); }
FASTCLIP_CPU_CLONES void scale_span_f16(void* x, int64_t n, double c) { scale_span<F16>(x, n, c); }
FASTCLIP_CPU_CLONES void clamp_span_f32(void* x, int64_t n, double v) { clamp_span<F32>(x, n, v); }
FASTCLIP_CPU_CLONES void clamp_span_f64(void* x, int64_t n, double v) { clamp_span<F64>(x, n, v); }
FASTCLIP_CPU_CLONES void clamp_span_bf16(void* x, int64_t n, double v) { clamp_span<BF16>(x, n, v); }
FASTCLIP_CPU_CLONES void clamp_span_f16(void* x, int64_t n, double v) { clamp_span<F16>(x, n, v); }

}  // namespace cpu
}  // namespace fastclip
