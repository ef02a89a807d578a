// fastclip CPU span kernels for a general order p: sum |x|^p and max |x|.
//
// libm's pow is a scalar call (~12 ns per element here, 2.5x slower than
// torch's vectorized float pow); |x|^p is computed instead as 2^(p log2|x|)
// by polynomials in double that GCC vectorizes. Error per term: about
// 2^-52 (4 + |p log2 |x||) relative, the rounding of the exponent p log2 |x|
// (~1e-13 where it nears +-1000, ~1e-15 near 0; 2.1e-13 at worst measured,
// p = 1500), far below the float32 result's rounding; the norm's is that
// over p.
//
// Options for the whole file, first in it, so that every function here
// (inline ones from headers too) has the same ones and inlines:
// - no-trapping-math: GCC if-converts the selects below into vector blends
//   only when FP operations may be speculated; nothing here reads
//   floating-point exception flags, and no result changes (the inline
//   header functions this file may emit, at -O0, compute alike under it);
// - fp-contract=off: no fused multiply-adds, which the x86-64-v3/v4 clones
//   would form and the baseline cannot: the same bits on every CPU (and
//   with clang, which contracts within a statement by default).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "span_common.h"

namespace fastclip {
namespace cpu {
namespace {

FASTCLIP_ALWAYS_INLINE uint64_t bits_of_double(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof(u));
  return u;
}
FASTCLIP_ALWAYS_INLINE double double_of(uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof(d));
  return d;
}

constexpr uint64_t kMantissaBits = 0x000FFFFFFFFFFFFFull;
constexpr uint64_t kExponentOfOne = 0x3FF0000000000000ull;
constexpr int kMantissaWidth = 52;
constexpr double kDoubleMax = 1.7976931348623157e308;
constexpr double kSmallestNormal = 0x1p-1022;
// Subnormal inputs (fp64 data) are lifted by 2^64 into the normal range.
constexpr double kSubnormalLift = 0x1p64;
constexpr double kBias = 1023.0;
constexpr double kLiftedBias = kBias + 64.0;
constexpr double kSqrt2 = 1.4142135623730950488;
constexpr double kInvLn2 = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;
// y + kRoundMagic rounds y (|y| < 2^51) to an integer n, held in the low
// bits of the sum's representation.
constexpr double kRoundMagic = 0x1.8p52;
// 2^y is 0 or inf beyond +-1075; clamped first so that n stays small.
constexpr double kExponentClamp = 1100.0;
// Beyond +-1000, 2^n is applied in two steps (2^(n -+ 128), then 2^+-128):
// n alone would leave the exponent field; the second step rounds a
// subnormal result, or overflows to inf, as pow does.
constexpr double kTwoStepLimit = 1000.0;
constexpr uint64_t kTwoStepShift = uint64_t{128} << kMantissaWidth;

// |v|^p for p > 0 (finite): 0 for 0, inf for inf, NaN for NaN. No calls and
// no branches (selects), so that loops over it vectorize.
FASTCLIP_ALWAYS_INLINE double power_of_abs(double v, double p) {
  const double a = std::fabs(v);
  // log2 a = e + log2 m, m in [sqrt(1/2), sqrt(2)).
  const bool tiny = a < kSmallestNormal;
  const uint64_t u = bits_of_double(a * (tiny ? kSubnormalLift : 1.0));
  double m = double_of((u & kMantissaBits) | kExponentOfOne);
  const bool high = m >= kSqrt2;
  m = m * (high ? 0.5 : 1.0);
  // The biased exponent as a double without an int64 conversion (AVX2 has none).
  const uint64_t biased = (u >> kMantissaWidth) + (high ? 1 : 0);
  const double e = (double_of(bits_of_double(0x1p52) + biased) - 0x1p52) - (tiny ? kLiftedBias : kBias);
  // ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), |s| <= 0.172; the terms
  // after s^19/19 are below 2^-55 of the first (one fewer left a bias of a
  // few ulps near sqrt(2), found in review).
  const double f = m - 1.0;  // exact
  const double s = f / (2.0 + f);
  const double z = s * s;
  double q = z * (1.0 / 19) + 1.0 / 17;
  q = q * z + 1.0 / 15;
  q = q * z + 1.0 / 13;
  q = q * z + 1.0 / 11;
  q = q * z + 1.0 / 9;
  q = q * z + 1.0 / 7;
  q = q * z + 1.0 / 5;
  q = q * z + 1.0 / 3;
  const double two_s = 2.0 * s;
  const double ln_m = two_s * z * q + two_s;
  double y = p * (ln_m * kInvLn2 + e);
  y = y < -kExponentClamp ? -kExponentClamp : y;
  y = y > kExponentClamp ? kExponentClamp : y;
  // 2^y = 2^n e^g, g = (y - n) ln 2 in [-0.35, 0.35]: Taylor to g^13/13!
  // (the rest is below 2^-55).
  const double t = y + kRoundMagic;
  const double n = t - kRoundMagic;
  const double g = (y - n) * kLn2;
  double r = g * (1.0 / 6227020800.0) + 1.0 / 479001600.0;
  r = r * g + 1.0 / 39916800.0;
  r = r * g + 1.0 / 3628800.0;
  r = r * g + 1.0 / 362880.0;
  r = r * g + 1.0 / 40320.0;
  r = r * g + 1.0 / 5040.0;
  r = r * g + 1.0 / 720.0;
  r = r * g + 1.0 / 120.0;
  r = r * g + 1.0 / 24.0;
  r = r * g + 1.0 / 6.0;
  r = r * g + 0.5;
  r = r * g + 1.0;
  r = r * g + 1.0;
  const bool low = n < -kTwoStepLimit;
  const bool big = n > kTwoStepLimit;
  const uint64_t step = low ? kTwoStepShift : (big ? uint64_t{0} - kTwoStepShift : 0);
  const double second = low ? 0x1p-128 : (big ? 0x1p128 : 1.0);
  const uint64_t n_field = (bits_of_double(t) - bits_of_double(kRoundMagic)) << kMantissaWidth;
  const double power = double_of(bits_of_double(r) + n_field + step) * second;
  return (a > 0.0 && a <= kDoubleMax) ? power : a;
}

// The power sum and max |x| of x[0, n), lanes as in spans.cpp's kernels.
// kScaled: the rescue pass, values divided by `divisor` (max |x|, see
// numerics.h) first.
template <typename E, bool kScaled>
FASTCLIP_ALWAYS_INLINE NormPartial power_span(const typename E::storage* x, int64_t n, double p, double divisor,
                                              PrefetchStream& prefetch) {
  using T = typename E::compute;
  double acc[kLanes];
  T amax[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    acc[l] = 0.0;
    amax[l] = T(0);
  }
  auto step = [&](int l, T raw) __attribute__((always_inline)) {
    amax[l] = max_keep_nan(amax[l], std::fabs(raw));
    double v = static_cast<double>(raw);
    if (kScaled) v /= divisor;
    acc[l] += power_of_abs(v, p);
  };
  for_each_element<E>(x, n, prefetch, step);
  fold_lanes(acc, amax);
  return NormPartial{acc[0], static_cast<double>(amax[0])};
}

template <typename E>
FASTCLIP_ALWAYS_INLINE NormPartial power_span(const void* data, int64_t n, NormOrder order, bool scaled, double divisor,
                                              PrefetchStream& prefetch) {
  const auto* x = static_cast<const typename E::storage*>(data);
  return scaled ? power_span<E, true>(x, n, order.p, divisor, prefetch)
                : power_span<E, false>(x, n, order.p, divisor, prefetch);
}

}  // namespace

FASTCLIP_CPU_CLONES FASTCLIP_NORM_SPAN(power_span_f32) {
  return power_span<F32>(x, n, order, scaled, divisor, prefetch);
}
FASTCLIP_CPU_CLONES FASTCLIP_NORM_SPAN(power_span_f64) {
  return power_span<F64>(x, n, order, scaled, divisor, prefetch);
}
FASTCLIP_CPU_CLONES FASTCLIP_NORM_SPAN(power_span_f16) {
  return power_span<F16>(x, n, order, scaled, divisor, prefetch);
}
FASTCLIP_CPU_CLONES FASTCLIP_NORM_SPAN(power_span_bf16) {
  return power_span<BF16>(x, n, order, scaled, divisor, prefetch);
}

}  // namespace cpu
}  // namespace fastclip
