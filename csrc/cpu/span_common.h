// fastclip CPU span kernels: what the kernel files share (ATen-free).
#pragma once

#include <cstdint>

#include "spans.h"

// Hot loops are compiled for several x86 ISA levels and picked at load time
// (GCC function multi-versioning): the baseline x86-64 build of a wheel
// would otherwise leave AVX2/AVX-512 unused.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FASTCLIP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCLIP_CPU_CLONES
#endif
#if defined(__GNUC__) && !defined(__clang__)
#define FASTCLIP_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define FASTCLIP_NO_FP_CONTRACT  // no ISA clones without GCC: one build, the same bits on every CPU
#endif

// GCC turns loops that zero the kernels' lanes into memset calls, inlined
// as `rep stos`: ~25 of the 58 ns that a norm of a one-element span cost
// (Zen 3; 0.25 ms per norm of 10,000 one-element gradients). For the
// kernel files only (this header is theirs); clang has no such flag.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

namespace fastclip {
namespace cpu {

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

// max that keeps NaN: once a lane holds NaN, no comparison replaces it.
// Bitwise | instead of || keeps the loop free of branches (vectorizable).
template <typename T>
FASTCLIP_ALWAYS_INLINE T max_keep_nan(T m, T v) {
  return ((v > m) | (v != v)) ? v : m;
}

// Every element of x[0, n) in order, element i to lane i % kLanes:
// step(lane, value); the prefetch stream is told of each whole block read.
template <typename E, typename Step>
FASTCLIP_ALWAYS_INLINE void for_each_element(const typename E::storage* x, int64_t n, PrefetchStream& prefetch,
                                             const Step& step) {
  constexpr int64_t kBlockBytes = kLanes * static_cast<int64_t>(sizeof(typename E::storage));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch.advance(kBlockBytes);
    for (int l = 0; l < kLanes; ++l) step(l, E::load(x, i + l));
  }
  for (int l = 0; i < n; ++i, ++l) step(l, E::load(x, i));
}

// The lanes' sums and maxima folded into lane 0 by a fixed tree: the same
// bits on every ISA level and whatever the vector width. A kernel that
// returns only one of them folds only that one (the other fold's stores
// were kept: ~3-5 ns of a 33 ns one-element span, C++ model on Zen 3).
template <typename T, bool kSums = true, bool kMaxes = true>
FASTCLIP_ALWAYS_INLINE void fold_lanes(double* acc, T* amax) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      if (kSums) acc[l] += acc[l + width];
      if (kMaxes) amax[l] = max_keep_nan(amax[l], amax[l + width]);
    }
  }
}

}  // namespace cpu
}  // namespace fastclip
