// fastclip: numerics shared by the CPU and CUDA kernels (no ATen, no CUDA
// runtime): 16-bit float conversions, norm orders, the overflow rescue and
// the clip coefficient. Everything is inline and usable on host and device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTCLIP_HD __host__ __device__ __forceinline__
#else
#define FASTCLIP_HD inline
#endif

namespace fastclip {

// torch's clip_grad_norm_ divides by (norm + 1e-6); kept for drop-in results.
constexpr double kClipEpsilon = 1e-6;

// Power sums below this may have lost digits to double underflow, so the
// tensor is recomputed with its values scaled (see rescue_scale). 2^-960
// leaves 64 binary orders of magnitude above the smallest normal double:
// contributions that underflowed are then below 2^-64 of the sum.
constexpr double kRescueTiny = 0x1p-960;

// Orders p below this always take the scaled recomputation (needs_rescue).
constexpr double kRescueSmallOrder = 0x1p-20;

// ---------------------------------------------------------------- bit casts
FASTCLIP_HD uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

FASTCLIP_HD float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// ------------------------------------------------ bfloat16 <-> float (exact)
FASTCLIP_HD float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// f rounded to bfloat16, in the top half of a 32-bit word (the low half is
// left over): round to nearest even; NaN stays a quiet NaN of the same
// sign. All 32-bit operations, so vectorized loops need no narrowing.
FASTCLIP_HD uint32_t bf16_word_of(float f) {
  const uint32_t u = bits_of(f);
  return f != f ? (u | 0x00400000u) : u + 0x7FFFu + ((u >> 16) & 1u);
}

FASTCLIP_HD uint16_t float_to_bf16(float f) { return static_cast<uint16_t>(bf16_word_of(f) >> 16); }

// ----------------------------------------------------- float16 <-> float
// Written as integer masks instead of branches so that compilers vectorize
// it; subnormals go through an exact int->float conversion so the result
// does not depend on the denormals-are-zero mode.
FASTCLIP_HD float half_to_float(uint16_t h) {
  constexpr uint32_t kExpRebias = (127u - 15u) << 23;  // half bias -> float bias
  constexpr uint32_t kHalfInf = 0x7C00u;
  constexpr uint32_t kHalfMinNormal = 0x0400u;
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t mag = static_cast<uint32_t>(h) & 0x7FFFu;
  const uint32_t normal = (mag << 13) + kExpRebias;
  const uint32_t special = (mag << 13) | 0x7F800000u;  // inf and NaN keep their payload
  const uint32_t subnormal = bits_of(static_cast<float>(static_cast<int32_t>(mag)) * 0x1p-24f);
  const uint32_t is_sub = 0u - static_cast<uint32_t>(mag < kHalfMinNormal);
  const uint32_t is_special = 0u - static_cast<uint32_t>(mag >= kHalfInf);
  const uint32_t out = (subnormal & is_sub) | (special & is_special) | (normal & ~(is_sub | is_special));
  return float_of(sign | out);
}

// Round to nearest even, overflow to inf, subnormals exact, NaN quiet.
FASTCLIP_HD uint16_t float_to_half(float f) {
  constexpr uint32_t kFloatInf = 0x7F800000u;
  constexpr uint32_t kOverflow = 0x477FF000u;   // 65520: the first value that rounds to inf
  constexpr uint32_t kMinNormal = 0x38800000u;  // 2^-14: smallest normal half
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7FFFFFFFu;
  // Adding 0.5 puts a value below 2^-14 on the 2^-24 grid of half subnormals
  // with the hardware's round-to-nearest-even; the low bits are the result.
  const uint32_t sub = bits_of(float_of(mag) + 0.5f) - bits_of(0.5f);
  const uint32_t normal = (mag - ((127u - 15u) << 23) + 0xFFFu + ((mag >> 13) & 1u)) >> 13;
  uint32_t out = mag < kMinNormal ? sub : normal;
  out = mag >= kOverflow ? 0x7C00u : out;
  out = mag > kFloatInf ? (0x7E00u | ((mag >> 13) & 0x3FFu)) : out;
  return static_cast<uint16_t>(sign | out);
}

// ---------------------------------------------------------------- norm order
enum class NormKind : int32_t { kOne = 0, kTwo = 1, kInf = 2, kP = 3 };

struct NormOrder {
  NormKind kind;
  double p;  // the order itself; used by kP only
};

// ord must already be validated: > 0 (finite) or +inf.
FASTCLIP_HD NormOrder make_norm_order(double ord) {
  if (ord == 1.0) return NormOrder{NormKind::kOne, 1.0};
  if (ord == 2.0) return NormOrder{NormKind::kTwo, 2.0};
  if (ord > 1.7976931348623157e308) return NormOrder{NormKind::kInf, ord};
  return NormOrder{NormKind::kP, ord};
}

// Partial result of one chunk: acc is the power sum sum|x|^p (the max |x|
// for the inf-norm); amax is max |x|, kept only where a rescue is possible.
struct NormPartial {
  double acc;
  double amax;
};

FASTCLIP_HD bool is_nan(double x) { return x != x; }
FASTCLIP_HD bool is_inf(double x) { return x == INFINITY; }

// max that propagates NaN from either side, as torch's inf-norm does.
FASTCLIP_HD double nan_max(double a, double b) {
  if (is_nan(a)) return a;
  return (b > a || is_nan(b)) ? b : a;
}

FASTCLIP_HD double combine_acc(NormOrder order, double a, double b) {
  return order.kind == NormKind::kInf ? nan_max(a, b) : a + b;
}

// A power sum of unscaled values that overflowed, or whose root would:
// with p < 1 the root grows faster than the sum (found in review: one
// fp64 value a few ulps below the largest double came out inf at p = 0.5,
// the root's rounding pushing it over). A NaN sum is neither.
FASTCLIP_HD bool sum_overflowed(NormOrder order, double acc) {
  if (is_inf(acc)) return true;
  const bool small_p = order.kind == NormKind::kP && order.p < 1.0;
  return small_p && acc > 1.0 && !(pow(acc, 1.0 / order.p) <= 1.7976931348623157e308);
}

// A power sum needs a scaled recomputation when it overflowed (the data
// was finite but the sum is inf) or is so small that underflow may have
// eaten digits; all_overflowed marks the case where only the sum over all
// tensors overflowed.
// Below kRescueSmallOrder every tensor is rescued: |x|^p then rounds to
// 1 + p ln|x| +- 2^-53, and the root raises that error to the power 1/p
// (4 came out as 1 at p = 1e-17, 3.9999957 at 1e-10; found in review).
// Rescued, the largest term is exactly 1. Two non-zero elements have an
// infinite norm at such an order anyway (at least 2^(2^20)), so the rescue
// costs a second pass only where the norm is one value or inf.
FASTCLIP_HD bool needs_rescue(NormOrder order, double acc, double amax, bool all_overflowed) {
  const bool finite_data = amax > 0.0 && amax <= 1.7976931348623157e308;
  const bool small_order = order.kind == NormKind::kP && order.p < kRescueSmallOrder;
  return finite_data && (sum_overflowed(order, acc) || acc < kRescueTiny || all_overflowed || small_order);
}

// A power sum scaled by s is the sum of (|x| / s)^p: the norm is
// s * sum^(1/p). For p = 1, 2 the scale is a power of two (exact scaling);
// for a general order p it is max |x| itself, so the largest term is
// exactly 1: nothing can overflow (the sum is at most the element count)
// and nothing that matters can underflow, for any order p. A power of two
// could not do that for p above ~1022: the largest scaled value would lie
// in [0.5, 1), and 0.5^1100 is below the smallest double.
//
// The scale of a rescued tensor whose largest |x| is amax (finite, > 0).
// 2^1024 is not a double: from 2^1023 on, values scale into [1, 2), whose
// squares cannot overflow either. The scale is never below the smallest
// normal double: a thread that reads subnormals as 0 (DAZ) would divide by
// 0. Data that small has a norm of 0 in float32 anyway.
FASTCLIP_HD double rescue_scale(NormOrder order, double amax) {
  constexpr int kMinScaleExp = -1022;  // 2^-1022: the smallest normal double
  constexpr int kMaxScaleExp = 1023;
  constexpr double kSmallestNormal = 2.2250738585072014e-308;
  if (order.kind == NormKind::kP) return amax > kSmallestNormal ? amax : kSmallestNormal;
  int e = 0;
  frexp(amax, &e);  // amax = m * 2^e, 0.5 <= m < 1
  e = e < kMinScaleExp ? kMinScaleExp : e;
  return ldexp(1.0, e < kMaxScaleExp ? e : kMaxScaleExp);
}

// (from / to)^p for 0 <= from <= to: one scaled value (or scale) relative
// to a larger scale. Exact for p = 1 when the ratio is a power of two. For
// a general p, a ratio that underflows is taken in logarithms: a tiny
// ratio to a small power is not negligible ((5e-324 / 3)^0.01 = 6e-4).
FASTCLIP_HD double ratio_power(NormOrder order, double from, double to) {
  const double ratio = from / to;
  switch (order.kind) {
    case NormKind::kOne:
      return ratio;
    case NormKind::kTwo:
      return ratio * ratio;
    default:
      return ratio >= 2.2250738585072014e-308 || from == 0.0 || !(from <= 1.7976931348623157e308)
                 ? pow(ratio, order.p)
                 : exp2(order.p * (log2(from) - log2(to)));
  }
}

// A power sum scaled by `from` re-expressed for the larger scale `to`; a
// non-finite sum (from non-finite data) is kept: inf * 0 would be NaN.
FASTCLIP_HD double rescale_sum(NormOrder order, double acc, double from, double to) {
  if (from == to || !(acc <= 1.7976931348623157e308)) return acc;
  if (order.kind == NormKind::kTwo) {
    // One factor at a time: a tiny ratio underflows the product only when
    // the term is negligible anyway.
    const double ratio = from / to;
    return acc * ratio * ratio;
  }
  return acc * ratio_power(order, from, to);
}

// Norm from a power sum of values scaled by s: s * sum^(1/p). A non-finite
// sum (from inf or NaN data) is the norm itself, whatever the scale.
FASTCLIP_HD double root_scaled(NormOrder order, double acc, double s) {
  if (!(acc <= 1.7976931348623157e308)) return acc;
  switch (order.kind) {
    case NormKind::kOne:
      return s * acc;
    case NormKind::kTwo:
      return s * sqrt(acc);
    case NormKind::kInf:
      return acc;
    default: {
      // With p < 1, acc^(1/p) can overflow where s * acc^(1/p) does not
      // (s tiny): then in logarithms.
      const double root = pow(acc, 1.0 / order.p);
      return root <= 1.7976931348623157e308 ? s * root : exp2(log2(s) + log2(acc) / order.p);
    }
  }
}

// Total norm from per-tensor power sums acc[t] of values scaled by
// scales[t], summed in tensor order (fixed order: bitwise reproducible).
FASTCLIP_HD double combine_scaled(NormOrder order, const double* acc, const double* scales, int64_t n) {
  if (order.kind == NormKind::kInf) {
    double m = 0.0;
    for (int64_t t = 0; t < n; ++t) m = nan_max(m, acc[t]);
    return m;
  }
  // Align every sum to the largest scale: ratios are <= 1, so nothing
  // overflows and only negligible terms can underflow. A zero sum carries
  // no scale.
  double top = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    if (acc[t] > 0.0 && scales[t] > top) top = scales[t];
  }
  double sum = 0.0;
  for (int64_t t = 0; t < n; ++t) sum += acc[t] > 0.0 ? rescale_sum(order, acc[t], scales[t], top) : acc[t];
  return root_scaled(order, sum, top > 0.0 ? top : 1.0);
}

// min(1, max_norm / (norm + 1e-6)), NaN-propagating like torch.clamp.
FASTCLIP_HD double clip_coefficient(double max_norm, double total_norm) {
  const double c = max_norm / (total_norm + kClipEpsilon);
  return (is_nan(c) || c < 1.0) ? c : 1.0;
}

// float's smallest normal value, 2^-126.
constexpr double kFloatMinNormal = 0x1p-126;

// A coefficient below kFloatMinNormal keeps fewer bits as a float (none
// below 2^-149): data computed in float is then scaled in double and
// rounded once (a clip by a norm above 2^126 times max_norm; found in
// review: fp32 gradients of norm 3e41 came out 1e-4 off).
FASTCLIP_HD bool scale_needs_double(double coef) { return coef != 0.0 && fabs(coef) < kFloatMinNormal; }

// NaN, inf or -inf (a negative loss scale can make a norm -inf).
FASTCLIP_HD bool not_finite(double x) { return !(fabs(x) < INFINITY); }

// The scalars of one clipped optimizer step (the clip_scalars_ op), from
// the float64 norm of the gradients as they are (still multiplied by a
// loss scale, if any). One function for the CPU and the CUDA kernel.
struct StepScalars {
  double norm;    // the gradients' norm without the loss scale
  double coef;    // min(1, max_norm / (norm + 1e-6))
  double factor;  // coef / loss_scale: what an unfused step multiplies the gradients by
  float divisor;  // loss_scale * extra_scale / coef in float32: a fused step's grad_scale
  bool found;     // the step must not be taken
};

// loss_scale, extra_scale: 1 when absent. found_in: a flag given from
// outside is set. skip_inf_divisor: a divisor beyond float32's range
// (which no fused float32 kernel can apply) also sets `found`.
FASTCLIP_HD StepScalars step_scalars(double raw_norm, double max_norm, double loss_scale, double extra_scale,
                                     bool found_in, bool skip_inf_divisor) {
  StepScalars s;
  s.norm = raw_norm / loss_scale;
  s.coef = clip_coefficient(max_norm, s.norm);
  s.factor = s.coef / loss_scale;
  s.divisor = static_cast<float>(loss_scale * extra_scale / s.coef);
  s.found = found_in || not_finite(s.norm) || (skip_inf_divisor && fabs(s.divisor) == INFINITY);
  return s;
}

}  // namespace fastclip
