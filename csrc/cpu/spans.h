// fastclip CPU span kernels (ATen-free): one contiguous span of one dtype
// per call. The driver in multi_tensor_cpu.cpp cuts tensors into spans and
// runs them on ATen's threads.
#pragma once

#include <cstdint>

#include "../fastclip.h"

namespace fastclip {
namespace cpu {

// Norm partial of x[0, n). With `scaled`, values are divided by `divisor`
// first (the overflow/underflow rescue pass; see NormReducer).
using NormSpanFn = NormPartial (*)(const void* x, int64_t n, NormOrder order, bool scaled, double divisor);
// In-place update of x[0, n) by a value (a coefficient or a clamp bound).
using UpdateSpanFn = void (*)(void* x, int64_t n, double value);

NormPartial norm_span_f32(const void* x, int64_t n, NormOrder order, bool scaled, double divisor);
NormPartial norm_span_f64(const void* x, int64_t n, NormOrder order, bool scaled, double divisor);
NormPartial norm_span_f16(const void* x, int64_t n, NormOrder order, bool scaled, double divisor);
NormPartial norm_span_bf16(const void* x, int64_t n, NormOrder order, bool scaled, double divisor);

// x *= coef; 16-bit types compute in float and round once (torch's opmath).
void scale_span_f32(void* x, int64_t n, double coef);
void scale_span_f64(void* x, int64_t n, double coef);
void scale_span_f16(void* x, int64_t n, double coef);
void scale_span_bf16(void* x, int64_t n, double coef);

// Asks the memory system for x[0, bytes) ahead of use, into L2 (not L1:
// the span that is running is using L1). Only worth it where hardware
// prefetchers cannot see the next span coming (see multi_tensor_cpu.cpp).
void prefetch_bytes(const void* x, int64_t bytes);

// x = clamp(x, -bound, bound); NaN stays NaN.
void clamp_span_f32(void* x, int64_t n, double bound);
void clamp_span_f64(void* x, int64_t n, double bound);
void clamp_span_f16(void* x, int64_t n, double bound);
void clamp_span_bf16(void* x, int64_t n, double bound);

inline NormSpanFn norm_fn(DType d) {
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
