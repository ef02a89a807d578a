// fastclip CUDA launchers: framework-free declarations (no ATen). The
// tables and outputs live in device memory; the caller owns them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../fastclip.h"

namespace fastclip {
namespace cuda {

// The chunk table of one call, in device memory (see plan_chunks).
struct DeviceTable {
  const TensorDesc* tensors;  // num_tensors descriptors
  const Chunk* chunks;        // num_chunks chunks, grouped by tensor in order
  int64_t num_tensors;
  int64_t num_chunks;
};

// Device buffers written by launch_norm.
struct NormOutputs {
  NormPartial* partials;  // scratch, one per chunk
  unsigned int* ticket;   // zero before the first launch; left at zero after each
  float* total;           // the total norm
  float* per_tensor;      // num_tensors norms, or nullptr
  float* coef;            // min(1, max_norm / (norm + 1e-6)), or nullptr
};

// Norm of all tensors in one launch; per-tensor norms and the clip
// coefficient are written by the same launch.
cudaError_t launch_norm(const DeviceTable& table, NormOrder order, double max_norm, const NormOutputs& out,
                        int num_sms, cudaStream_t stream);

// tensors *= *coef in place; returns at once on the device when *coef == 1.
cudaError_t launch_scale(const DeviceTable& table, const float* coef, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastclip
