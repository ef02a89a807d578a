// fastclip CPU span kernels: the per-chunk loops, free of ATen.
//
// Each function processes one contiguous span of one dtype. They are
// plain loops over kLanes independent accumulators, which GCC vectorizes
// for each ISA level of FASTCLIP_CPU_CLONES without reassociating
// floating-point sums, so results are bitwise reproducible.
#include "span_common.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
// Hardware conversions picked at run time: fp16 through F16C (GCC does not
// vectorize _Float16 conversions, and the portable integer-mask conversion
// costs twice the time of bf16 per element), and the rounding of bf16
// scale and clamp results through AVX512-BF16. GCC only: the target
// attribute is put on lambdas, which is GCC's syntax.
#define FASTCLIP_X86_CONVERSIONS 1
#endif

namespace fastclip {
namespace cpu {
namespace {

// bf16 pairs: two adjacent elements as one 32-bit word (memcpy: any
// alignment, no aliasing). Widening either one to float, and rounding
// both back into one word, are in-lane shifts and masks; element-wise
// 16-bit loops need cross-lane permutes per vector instead, and bf16 loops
// are bound by that arithmetic per core, not by memory.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
constexpr int kFirstShift = 16;  // the first element is the word's top half
#else
constexpr int kFirstShift = 0;
#endif
constexpr int kSecondShift = 16 - kFirstShift;
constexpr uint32_t kPairMagnitudes = 0x7FFF7FFFu;  // a pair without its two sign bits

FASTCLIP_ALWAYS_INLINE uint32_t load_pair(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}
FASTCLIP_ALWAYS_INLINE void store_pair(uint16_t* p, uint32_t w) { std::memcpy(p, &w, sizeof(w)); }
// Element k (0 or 1) of a pair as float: its 16 bits moved to the top.
FASTCLIP_ALWAYS_INLINE float bf16_first(uint32_t w) {
  return float_of(kFirstShift ? (w & 0xFFFF0000u) : (w << 16));
}
FASTCLIP_ALWAYS_INLINE float bf16_second(uint32_t w) {
  return float_of(kSecondShift ? (w & 0xFFFF0000u) : (w << 16));
}
// Two rounded words (bf16_word_of: the value in the top half) as one pair.
FASTCLIP_ALWAYS_INLINE uint32_t bf16_join(uint32_t first, uint32_t second) {
  return kFirstShift ? ((first & 0xFFFF0000u) | (second >> 16)) : ((first >> 16) | (second & 0xFFFF0000u));
}

// ----------------------------------------------------------------- norm
// kScaled: the rescue pass, values divided by `divisor` first.
template <typename E, NormKind K, bool kScaled>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span_impl(const typename E::storage* x, int64_t n, double divisor,
                                                  PrefetchStream& prefetch) {
  using T = typename E::compute;
  // max |x| is only needed where a rescue can happen (fp64 data; see
  // numerics.h); it and the inf-norm are exact in the element's own
  // compute type. A general order p has its own kernels (power.cpp).
  constexpr bool kTrackMax = K != NormKind::kInf && std::is_same<E, F64>::value;
  double acc[kLanes];
  T amax[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    acc[l] = 0.0;
    amax[l] = T(0);
  }

  // `magnitude`: |raw| (or raw where only its square is taken).
  auto take = [&](int l, T magnitude) __attribute__((always_inline)) {
    if (K == NormKind::kInf || kTrackMax) amax[l] = max_keep_nan(amax[l], magnitude);
    if (K == NormKind::kInf) return;
    double v = static_cast<double>(magnitude);
    if (kScaled) v /= divisor;
    if (K == NormKind::kTwo) acc[l] += v * v;
    if (K == NormKind::kOne) acc[l] += v;
  };
  auto step = [&](int l, T raw) __attribute__((always_inline)) {
    take(l, K == NormKind::kTwo && !kTrackMax ? raw : std::fabs(raw));
  };

  if constexpr (std::is_same<E, BF16>::value) {
    // bf16 read as pairs in 32-bit words (any 2-byte alignment): elements
    // 2w and 2w+1 of a block go to lanes w and w + kLanes/2. Both widen by
    // one in-lane shift or mask, where element-wise lanes cost a cross-lane
    // permute per vector (bf16 norms are conversion-bound per core).
    constexpr int64_t kBlockBytes = kLanes * static_cast<int64_t>(sizeof(uint16_t));
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      prefetch.advance(kBlockBytes);
      for (int w = 0; w < kLanes / 2; ++w) {
        const uint32_t pair = load_pair(x + i + 2 * w);
        if (K == NormKind::kOne) {
          // Both signs cleared in the word: GCC left this loop largely
          // scalar when the absolute value came after the widening (3.1
          // against 4.8 G elements/s on one Zen 4 core from L2; order 2
          // measured 3% slower this way, so it keeps the other form).
          const uint32_t magnitudes = pair & kPairMagnitudes;
          take(w, bf16_first(magnitudes));
          take(w + kLanes / 2, bf16_second(magnitudes));
        } else {
          step(w, bf16_first(pair));
          step(w + kLanes / 2, bf16_second(pair));
        }
      }
    }
    for (int l = 0; i < n; ++i, ++l) step(l, E::load(x, i));
  } else {
    for_each_element<E>(x, n, prefetch, step);
  }
  fold_lanes<T, K != NormKind::kInf, K == NormKind::kInf || kTrackMax>(acc, amax);
  const double top = static_cast<double>(amax[0]);
  return K == NormKind::kInf ? NormPartial{top, 0.0} : NormPartial{acc[0], kTrackMax ? top : 0.0};
}

// Orders 2, 1 and inf; the driver gives a general p to power.cpp's kernels.
template <typename E, bool kScaled>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span_order(const typename E::storage* x, int64_t n, NormOrder order,
                                                   double divisor, PrefetchStream& prefetch) {
  switch (order.kind) {
    case NormKind::kTwo:
      return norm_span_impl<E, NormKind::kTwo, kScaled>(x, n, divisor, prefetch);
    case NormKind::kOne:
      return norm_span_impl<E, NormKind::kOne, kScaled>(x, n, divisor, prefetch);
    default:
      return norm_span_impl<E, NormKind::kInf, kScaled>(x, n, divisor, prefetch);
  }
}

template <typename E>
FASTCLIP_ALWAYS_INLINE NormPartial norm_span(const void* data, int64_t n, NormOrder order, bool scaled,
                                             double divisor, PrefetchStream& prefetch) {
  const auto* x = static_cast<const typename E::storage*>(data);
  return scaled ? norm_span_order<E, true>(x, n, order, divisor, prefetch)
                : norm_span_order<E, false>(x, n, order, divisor, prefetch);
}

// ---------------------------------------------------------- scale, clamp
template <typename E, typename Op>
FASTCLIP_ALWAYS_INLINE void update_span(void* data, int64_t n, const Op& op, PrefetchStream& prefetch) {
  auto* x = static_cast<typename E::storage*>(data);
  // bf16: elements i and i + 1 as one 32-bit word (see load_pair).
  auto update_pair = [&](auto i) __attribute__((always_inline)) {  // generic: instantiated for bf16 only
    const uint32_t pair = load_pair(x + i);
    store_pair(x + i, bf16_join(bf16_word_of(op(bf16_first(pair))), bf16_word_of(op(bf16_second(pair)))));
  };
  constexpr int64_t kBlockBytes = kLanes * static_cast<int64_t>(sizeof(typename E::storage));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch.advance(kBlockBytes);
    if constexpr (std::is_same<E, BF16>::value) {
      for (int w = 0; w < kLanes; w += 2) update_pair(i + w);
    } else {
      for (int l = 0; l < kLanes; ++l) x[i + l] = E::store(op(E::load(x, i + l)));
    }
  }
  if constexpr (std::is_same<E, BF16>::value) {
    for (; i + 2 <= n; i += 2) update_pair(i);
  }
  for (; i < n; ++i) x[i] = E::store(op(E::load(x, i)));
}

// 16-bit types compute in float and round once, as torch's opmath does;
// in double where the coefficient is below float's normal range.
template <typename E>
FASTCLIP_ALWAYS_INLINE void scale_span(void* data, int64_t n, double coef, PrefetchStream& prefetch) {
  using T = typename E::compute;
  if constexpr (!std::is_same<T, double>::value) {
    if (scale_needs_double(coef)) {
      update_span<E>(data, n, [coef](T v) __attribute__((always_inline)) {
        return static_cast<T>(static_cast<double>(v) * coef);
      }, prefetch);
      return;
    }
  }
  const T c = static_cast<T>(coef);
  update_span<E>(data, n, [c](T v) __attribute__((always_inline)) { return v * c; }, prefetch);
}

// NaN compares false both ways and is kept, as torch.clamp keeps it.
template <typename E>
FASTCLIP_ALWAYS_INLINE void clamp_span(void* data, int64_t n, double bound, PrefetchStream& prefetch) {
  using T = typename E::compute;
  const T hi = static_cast<T>(bound);
  const T lo = -hi;
#if defined(__aarch64__)
  // FMAXNM/FMINNM read subnormal operands as zero while the thread flushes
  // denormals (FPCR.FZ), as torch's clamp does there and x86's maxps/minps
  // (what GCC makes of the selects below) do under DAZ; a compare and
  // select would return them, or a subnormal bound, unflushed (found
  // under qemu: bf16 clamps in torch.set_flush_denormal mode differed).
  update_span<E>(data, n, [lo, hi](T v) __attribute__((always_inline)) {
    return v != v ? v : std::fmin(std::fmax(v, lo), hi);
  }, prefetch);
#else
  update_span<E>(data, n, [lo, hi](T v) __attribute__((always_inline)) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
  }, prefetch);
#endif
}

}  // namespace

FASTCLIP_CPU_CLONES FASTCLIP_NORM_SPAN(norm_span_f32) {
  return norm_span<F32>(x, n, order, scaled, divisor, prefetch);
}
// No fused multiply-add for float64: its squares are inexact, so a fused
// square-and-add (the x86-64-v3/v4 clones, where GCC contracts) and a
// separate one (the baseline clone) gave different bits on different CPUs.
// Measured: 4% slower from L2 on one core, the same from memory.
FASTCLIP_CPU_CLONES FASTCLIP_NO_FP_CONTRACT FASTCLIP_NORM_SPAN(norm_span_f64) {
  return norm_span<F64>(x, n, order, scaled, divisor, prefetch);
}
FASTCLIP_CPU_CLONES FASTCLIP_NORM_SPAN(norm_span_bf16_portable) {
  return norm_span<BF16>(x, n, order, scaled, divisor, prefetch);
}
FASTCLIP_CPU_CLONES FASTCLIP_NORM_SPAN(norm_span_f16_portable) {
  return norm_span<F16>(x, n, order, scaled, divisor, prefetch);
}

FASTCLIP_CPU_CLONES FASTCLIP_UPDATE_SPAN(scale_span_f32) { scale_span<F32>(x, n, value, prefetch); }
FASTCLIP_CPU_CLONES FASTCLIP_UPDATE_SPAN(scale_span_f64) { scale_span<F64>(x, n, value, prefetch); }
FASTCLIP_CPU_CLONES FASTCLIP_UPDATE_SPAN(scale_span_bf16_portable) { scale_span<BF16>(x, n, value, prefetch); }
FASTCLIP_CPU_CLONES FASTCLIP_UPDATE_SPAN(scale_span_f16_portable) { scale_span<F16>(x, n, value, prefetch); }
FASTCLIP_CPU_CLONES FASTCLIP_UPDATE_SPAN(clamp_span_f32) { clamp_span<F32>(x, n, value, prefetch); }
FASTCLIP_CPU_CLONES FASTCLIP_UPDATE_SPAN(clamp_span_f64) { clamp_span<F64>(x, n, value, prefetch); }
FASTCLIP_CPU_CLONES FASTCLIP_UPDATE_SPAN(clamp_span_bf16_portable) { clamp_span<BF16>(x, n, value, prefetch); }
FASTCLIP_CPU_CLONES FASTCLIP_UPDATE_SPAN(clamp_span_f16_portable) { clamp_span<F16>(x, n, value, prefetch); }

#ifdef FASTCLIP_X86_CONVERSIONS
namespace {

#define FASTCLIP_F16C_TARGET __attribute__((target("avx2,fma,f16c")))

// Hardware conversions are exact like the portable ones (round to nearest
// even, subnormals kept, NaN stays NaN) unless the thread flushes
// denormals (MXCSR DAZ or FTZ, torch.set_flush_denormal): then the
// portable path runs, whose result does not depend on those modes.
bool f16c_usable() {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  constexpr unsigned kDenormalsAreZero = 0x0040u;
  constexpr unsigned kFlushToZero = 0x8000u;
  return cpu && (_mm_getcsr() & (kDenormalsAreZero | kFlushToZero)) == 0;
}

// Eight fp16 values at p as floats.
FASTCLIP_F16C_TARGET inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

FASTCLIP_F16C_TARGET inline void store8(uint16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

FASTCLIP_F16C_TARGET inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

// The portable loop's lanes, in registers: element i goes to lane
// i % kLanes, each lane sums in element order, and the lanes are folded by
// the same tree (the result is as reproducible as the portable one's).
constexpr int kVecs = kLanes / 8;  // fp16 vectors of 8 per step

template <NormKind K>
FASTCLIP_F16C_TARGET NormPartial norm_f16c(const uint16_t* x, int64_t n, PrefetchStream& prefetch) {
  constexpr int64_t kBlockBytes = kLanes * static_cast<int64_t>(sizeof(uint16_t));
  __m256d acc[2 * kVecs];  // lanes 4k..4k+3
  __m256 amax[kVecs];      // lanes 8k..8k+7 (inf-norm)
  for (int k = 0; k < 2 * kVecs; ++k) acc[k] = _mm256_setzero_pd();
  for (int k = 0; k < kVecs; ++k) amax[k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch.advance(kBlockBytes);
    for (int k = 0; k < kVecs; ++k) {
      const __m256 v = load8(x + i + 8 * k);
      if (K == NormKind::kInf) {
        // max that keeps NaN, as the portable max_keep_nan
        const __m256 a = abs8(v);
        const __m256 take = _mm256_or_ps(_mm256_cmp_ps(a, amax[k], _CMP_GT_OQ), _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        amax[k] = _mm256_blendv_ps(amax[k], a, take);
        continue;
      }
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      if (K == NormKind::kTwo) {
        acc[2 * k] = _mm256_fmadd_pd(lo, lo, acc[2 * k]);
        acc[2 * k + 1] = _mm256_fmadd_pd(hi, hi, acc[2 * k + 1]);
      } else {
        const __m256d sign = _mm256_set1_pd(-0.0);
        acc[2 * k] = _mm256_add_pd(acc[2 * k], _mm256_andnot_pd(sign, lo));
        acc[2 * k + 1] = _mm256_add_pd(acc[2 * k + 1], _mm256_andnot_pd(sign, hi));
      }
    }
  }
  double lanes[kLanes];
  float maxes[kLanes];
  for (int k = 0; k < 2 * kVecs; ++k) _mm256_storeu_pd(lanes + 4 * k, acc[k]);
  for (int k = 0; k < kVecs; ++k) _mm256_storeu_ps(maxes + 8 * k, amax[k]);
  for (int l = 0; i < n; ++i, ++l) {
    const float raw = half_to_float(x[i]);
    const double v = static_cast<double>(raw);
    if (K == NormKind::kInf) maxes[l] = max_keep_nan(maxes[l], std::fabs(raw));
    if (K == NormKind::kTwo) lanes[l] = std::fma(v, v, lanes[l]);
    if (K == NormKind::kOne) lanes[l] += std::fabs(v);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      lanes[l] += lanes[l + width];
      maxes[l] = max_keep_nan(maxes[l], maxes[l + width]);
    }
  }
  return K == NormKind::kInf ? NormPartial{static_cast<double>(maxes[0]), 0.0} : NormPartial{lanes[0], 0.0};
}

// x = op(x) for 8 floats at a time; the tail through the portable conversions.
template <typename Op>
FASTCLIP_F16C_TARGET void update_f16c(uint16_t* x, int64_t n, const Op& op, PrefetchStream& prefetch) {
  constexpr int64_t kBlockBytes = kLanes * static_cast<int64_t>(sizeof(uint16_t));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch.advance(kBlockBytes);
    for (int k = 0; k < kVecs; ++k) store8(x + i + 8 * k, op(load8(x + i + 8 * k)));
  }
  for (; i + 8 <= n; i += 8) store8(x + i, op(load8(x + i)));
  if (i < n) {
    // The tail as one padded vector: the same hardware rounding as the body.
    alignas(16) uint16_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = i; j < n; ++j) tail[j - i] = x[j];
    store8(tail, op(load8(tail)));
    for (int64_t j = i; j < n; ++j) x[j] = tail[j - i];
  }
}

// ------------------------------------------------ bf16 through AVX512-BF16
#define FASTCLIP_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// vcvtne2ps2bf16 rounds to nearest even and quiets NaN exactly as
// bf16_word_of does, but reads subnormal inputs as zero whatever the
// MXCSR: a vector holding a subnormal result goes through the portable
// rounding instead (checked against it on every bf16 value times several
// coefficients). Not taken when the thread reads denormals as zero (DAZ),
// a mode whose effect on the subnormal check is not worth relying on.
bool bf16_cvt_usable() {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  constexpr unsigned kDenormalsAreZero = 0x0040u;
  return cpu && (_mm_getcsr() & kDenormalsAreZero) == 0;
}

// Where the words of vcvtne2ps2bf16(odd, even) go: its result holds the
// 16 even elements, then the 16 odd ones; element 2k is word k, 2k + 1 is
// word 16 + k.
alignas(64) constexpr uint16_t kInterleaveWords[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// (GCC 12 warns, wrongly, that its own _mm512_undefined_epi32 inside
// _mm512_slli_epi32 may be uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// x = op(x) for 32 values at a time; a vector with a subnormal result and
// the tail through `portable` (the same rounding), on the original values.
// The 32 values are read as 16 pairs (see load_pair): the even elements
// widen by a shift and the odd ones by a mask, in lane, and one word
// permute puts the rounded results back in order. Widening 16 elements at
// a time (vpmovzxwd, a cross-lane shuffle, and a shift) measured 17.9
// against 22.2 G elements/s on one Zen 4 core from L2, with the same bits.
template <typename Op>
FASTCLIP_BF16_TARGET void update_bf16_avx512(uint16_t* x, int64_t n, const Op& op, UpdateSpanFn portable,
                                             double value, PrefetchStream& prefetch) {
  static_assert(kFirstShift == 0, "x86 is little-endian: element 2w is the low half of pair word w");
  constexpr int kSubnormal = 0x20;  // vfpclassps category: denormal
  constexpr int64_t kBlock = 32;
  const __m512i high_halves = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i interleave = _mm512_load_si512(kInterleaveWords);
  PrefetchStream none;  // the blocks given to `portable` are already counted here
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    prefetch.advance(kBlock * static_cast<int64_t>(sizeof(uint16_t)));
    const __m512i pairs = _mm512_loadu_si512(x + i);
    const __m512 even = op(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)));
    const __m512 odd = op(_mm512_castsi512_ps(_mm512_and_si512(pairs, high_halves)));
    if ((_mm512_fpclass_ps_mask(even, kSubnormal) | _mm512_fpclass_ps_mask(odd, kSubnormal)) != 0) {
      portable(x + i, kBlock, value, none);
      continue;
    }
    const __m512i rounded = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
    _mm512_storeu_si512(x + i, _mm512_permutexvar_epi16(interleave, rounded));
  }
  if (i < n) portable(x + i, n - i, value, none);
}
#pragma GCC diagnostic pop

// ------------------------------------------- bf16 order 1 through AVX-512
// GCC vectorizes the portable order-1 bf16 loop only in part (4.8 against
// 11.8 G elements/s for order 2 on one Zen 4 core from L2). The same
// lanes in registers: a block's 16 pairs as one vector, signs cleared,
// even elements (lanes 0-15) widened by a shift and odd ones (lanes
// 16-31) by a mask, each lane summing in element order, folded by the
// same tree: the portable kernel's bits. Not taken when the thread reads
// denormals as zero, so that the portable kernel runs (and is tested)
// there; the widening to double reads subnormals as zero in that mode
// either way.
#define FASTCLIP_AVX512_TARGET __attribute__((target("avx512f")))

// After a bf16 order-1 kernel's whole blocks (their sums in `lanes`): the
// tail, element k to lane k, and the portable loop's fold.
inline NormPartial finish_norm1_bf16(double* lanes, const uint16_t* x, int64_t i, int64_t n) {
  float unused[kLanes] = {};
  for (int l = 0; i < n; ++i, ++l) lanes[l] += static_cast<double>(std::fabs(bf16_to_float(x[i])));
  fold_lanes(lanes, unused);
  return NormPartial{lanes[0], 0.0};
}

bool avx512_norm_usable() {
  static const bool cpu = __builtin_cpu_supports("avx512f");
  constexpr unsigned kDenormalsAreZero = 0x0040u;
  return cpu && (_mm_getcsr() & kDenormalsAreZero) == 0;
}

// (GCC 12 warns, wrongly, that its own _mm512_undefined_* inside these
// intrinsics may be uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
FASTCLIP_AVX512_TARGET inline __m512d widen_low(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
FASTCLIP_AVX512_TARGET inline __m512d widen_high(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

FASTCLIP_AVX512_TARGET NormPartial norm1_bf16_avx512(const uint16_t* x, int64_t n, PrefetchStream& prefetch) {
  static_assert(kFirstShift == 0, "x86 is little-endian: element 2w is the low half of pair word w");
  constexpr int kVecs = kLanes / 8;  // doubles per AVX-512 vector
  constexpr int64_t kBlockBytes = kLanes * static_cast<int64_t>(sizeof(uint16_t));
  const __m512i magnitudes = _mm512_set1_epi32(static_cast<int>(kPairMagnitudes));
  const __m512i high_halves = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512d acc[kVecs];  // lanes 8k..8k+7
  for (int k = 0; k < kVecs; ++k) acc[k] = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch.advance(kBlockBytes);
    const __m512i pairs = _mm512_and_si512(_mm512_loadu_si512(x + i), magnitudes);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_halves));
    acc[0] = _mm512_add_pd(acc[0], widen_low(even));
    acc[1] = _mm512_add_pd(acc[1], widen_high(even));
    acc[2] = _mm512_add_pd(acc[2], widen_low(odd));
    acc[3] = _mm512_add_pd(acc[3], widen_high(odd));
  }
  double lanes[kLanes];
  for (int k = 0; k < kVecs; ++k) _mm512_storeu_pd(lanes + 8 * k, acc[k]);
  return finish_norm1_bf16(lanes, x, i, n);
}
#pragma GCC diagnostic pop

// --------------------------------------------- bf16 order 1 through AVX2
// The same lanes for CPUs with AVX2 but not AVX-512: a block's 16 pairs as
// two vectors of 8, even elements of vector h to lanes 8h..8h+7, odd ones
// to lanes 16+8h..16+8h+7. The GCC clone of the portable loop ran the GPT-2
// bf16 order-1 norm (two threads, from memory, Zen 3) in 30-55 ms from one
// process to the next, this kernel in 18.5-21.6 (order 2: no gain, not
// taken). The same denormal rule as the AVX-512 kernel.
#define FASTCLIP_AVX2_TARGET __attribute__((target("avx2")))

bool avx2_norm_usable() {
  static const bool cpu = __builtin_cpu_supports("avx2");
  constexpr unsigned kDenormalsAreZero = 0x0040u;
  return cpu && (_mm_getcsr() & kDenormalsAreZero) == 0;
}

FASTCLIP_AVX2_TARGET NormPartial norm1_bf16_avx2(const uint16_t* x, int64_t n, PrefetchStream& prefetch) {
  static_assert(kFirstShift == 0, "x86 is little-endian: element 2w is the low half of pair word w");
  constexpr int kVecs = kLanes / 4;        // doubles per AVX2 vector
  constexpr int kElementsPerLoad = 16;     // 8 pair words
  constexpr int64_t kBlockBytes = kLanes * static_cast<int64_t>(sizeof(uint16_t));
  const __m256i magnitudes = _mm256_set1_epi32(static_cast<int>(kPairMagnitudes));
  const __m256i high_halves = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256d acc[kVecs];  // lanes 4k..4k+3
  for (int k = 0; k < kVecs; ++k) acc[k] = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch.advance(kBlockBytes);
    for (int h = 0; h < 2; ++h) {
      const __m256i pairs = _mm256_and_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i + kElementsPerLoad * h)), magnitudes);
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, high_halves));
      acc[2 * h] = _mm256_add_pd(acc[2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(even)));
      acc[2 * h + 1] = _mm256_add_pd(acc[2 * h + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(even, 1)));
      acc[4 + 2 * h] = _mm256_add_pd(acc[4 + 2 * h], _mm256_cvtps_pd(_mm256_castps256_ps128(odd)));
      acc[5 + 2 * h] = _mm256_add_pd(acc[5 + 2 * h], _mm256_cvtps_pd(_mm256_extractf128_ps(odd, 1)));
    }
  }
  double lanes[kLanes];
  for (int k = 0; k < kVecs; ++k) _mm256_storeu_pd(lanes + 4 * k, acc[k]);
  return finish_norm1_bf16(lanes, x, i, n);
}

}  // namespace
#endif

FASTCLIP_NORM_SPAN(norm_span_bf16) {
#ifdef FASTCLIP_X86_CONVERSIONS
  // A rescue pass (scaled) never runs for bf16 data of order 1.
  if (!scaled && order.kind == NormKind::kOne && avx512_norm_usable()) {
    return norm1_bf16_avx512(static_cast<const uint16_t*>(x), n, prefetch);
  }
  if (!scaled && order.kind == NormKind::kOne && avx2_norm_usable()) {
    return norm1_bf16_avx2(static_cast<const uint16_t*>(x), n, prefetch);
  }
#endif
  return norm_span_bf16_portable(x, n, order, scaled, divisor, prefetch);
}

FASTCLIP_UPDATE_SPAN(scale_span_bf16) {
#ifdef FASTCLIP_X86_CONVERSIONS
  if (bf16_cvt_usable() && !scale_needs_double(value)) {
    const float coef = static_cast<float>(value);
    update_bf16_avx512(
        static_cast<uint16_t*>(x), n,
        [coef](__m512 v) FASTCLIP_BF16_TARGET { return _mm512_mul_ps(v, _mm512_set1_ps(coef)); },
        scale_span_bf16_portable, value, prefetch);
    return;
  }
#endif
  scale_span_bf16_portable(x, n, value, prefetch);
}

FASTCLIP_UPDATE_SPAN(clamp_span_bf16) {
#ifdef FASTCLIP_X86_CONVERSIONS
  if (bf16_cvt_usable()) {
    const float hi = static_cast<float>(value);
    update_bf16_avx512(
        static_cast<uint16_t*>(x), n,
        [hi](__m512 v) FASTCLIP_BF16_TARGET {
          // NaN compares false both ways and is kept, as torch.clamp keeps it.
          const __m512 top = _mm512_set1_ps(hi);
          const __m512 bottom = _mm512_set1_ps(-hi);
          v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, bottom, _CMP_LT_OQ), v, bottom);
          return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, top, _CMP_GT_OQ), v, top);
        },
        clamp_span_bf16_portable, value, prefetch);
    return;
  }
#endif
  clamp_span_bf16_portable(x, n, value, prefetch);
}

FASTCLIP_NORM_SPAN(norm_span_f16) {
#ifdef FASTCLIP_X86_CONVERSIONS
  // A rescue pass (scaled) runs for fp64 data and a general p only, never
  // here; it would be portable.
  if (!scaled && f16c_usable()) {
    const auto* h = static_cast<const uint16_t*>(x);
    switch (order.kind) {
      case NormKind::kTwo:
        return norm_f16c<NormKind::kTwo>(h, n, prefetch);
      case NormKind::kOne:
        return norm_f16c<NormKind::kOne>(h, n, prefetch);
      default:
        return norm_f16c<NormKind::kInf>(h, n, prefetch);
    }
  }
#endif
  return norm_span_f16_portable(x, n, order, scaled, divisor, prefetch);
}

FASTCLIP_UPDATE_SPAN(scale_span_f16) {
#ifdef FASTCLIP_X86_CONVERSIONS
  if (f16c_usable() && !scale_needs_double(value)) {
    const float coef = static_cast<float>(value);
    update_f16c(
        static_cast<uint16_t*>(x), n,
        [coef](__m256 v) FASTCLIP_F16C_TARGET { return _mm256_mul_ps(v, _mm256_set1_ps(coef)); }, prefetch);
    return;
  }
#endif
  scale_span_f16_portable(x, n, value, prefetch);
}

FASTCLIP_UPDATE_SPAN(clamp_span_f16) {
#ifdef FASTCLIP_X86_CONVERSIONS
  if (f16c_usable()) {
    const float hi = static_cast<float>(value);
    update_f16c(static_cast<uint16_t*>(x), n, [hi](__m256 v) FASTCLIP_F16C_TARGET {
      // NaN compares false both ways and is kept, as torch.clamp keeps it.
      const __m256 top = _mm256_set1_ps(hi);
      const __m256 bottom = _mm256_set1_ps(-hi);
      v = _mm256_blendv_ps(v, bottom, _mm256_cmp_ps(v, bottom, _CMP_LT_OQ));
      return _mm256_blendv_ps(v, top, _mm256_cmp_ps(v, top, _CMP_GT_OQ));
    }, prefetch);
    return;
  }
#endif
  clamp_span_f16_portable(x, n, value, prefetch);
}

}  // namespace cpu
}  // namespace fastclip
