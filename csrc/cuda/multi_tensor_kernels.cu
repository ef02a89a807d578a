// fastclip CUDA kernels: framework-free (raw pointers, sizes, a stream).
//
// Status: compiled by CMake in CI for sm_80 and sm_90; not yet bound to
// torch (the CUDA glue and its tests are the CUDA issue's work, which grows
// this file: vector loads, the overflow rescue, a parallel final reduction).
//
// Norm: one launch over the chunk table of all tensors. Each block reduces
// whole chunks into per-chunk partials (double, fixed tree order); the last
// block to finish (an integer atomic ticket, no floating-point atomics)
// folds the partials in chunk order into per-tensor norms, the total norm
// and the clip coefficient, all on the device: results are bitwise
// reproducible and nothing is read back to the host.
// Scale: one launch that returns at once when the coefficient is 1.
#include <cuda_runtime.h>

#include "../fastclip.h"
#include "multi_tensor_kernels.h"

namespace fastclip {
namespace cuda {
namespace {

// 256 threads: 8 warps per block keep enough loads in flight per SM while
// the shared-memory tree reduction stays one short pass.
constexpr int kThreads = 256;
// Blocks per SM for the grid-stride loops: enough to hide memory latency.
constexpr int kBlocksPerSm = 4;

__device__ __forceinline__ double load_element(const TensorDesc& t, int64_t i) {
  switch (t.dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(t.data)[i];
    case DType::kFloat64:
      return static_cast<const double*>(t.data)[i];
    case DType::kFloat16:
      return half_to_float(static_cast<const uint16_t*>(t.data)[i]);
    default:
      return bf16_to_float(static_cast<const uint16_t*>(t.data)[i]);
  }
}

__device__ __forceinline__ double accumulate(NormOrder order, double acc, double v) {
  switch (order.kind) {
    case NormKind::kTwo:
      return acc + v * v;
    case NormKind::kOne:
      return acc + fabs(v);
    case NormKind::kInf:
      return nan_max(acc, fabs(v));
    default:
      return acc + pow(fabs(v), order.p);
  }
}

// Fixed-order tree reduction over the block (same order every run).
__device__ double block_reduce(NormOrder order, double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] = combine_acc(order, shared[threadIdx.x], shared[threadIdx.x + width]);
    __syncthreads();
  }
  const double out = shared[0];
  __syncthreads();
  return out;
}

__global__ void __launch_bounds__(kThreads)
    norm_kernel(DeviceTable table, NormOrder order, double max_norm, NormOutputs out) {
  __shared__ double shared[kThreads];
  for (int64_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const Chunk ch = table.chunks[c];
    const TensorDesc t = table.tensors[ch.tensor];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < ch.size; i += kThreads) acc = accumulate(order, acc, load_element(t, ch.begin + i));
    acc = block_reduce(order, acc, shared);
    if (threadIdx.x == 0) out.partials[c] = NormPartial{acc, 0.0};
  }

  // Last block: make every block's partials visible, then take a ticket.
  __shared__ bool last;
  __threadfence();
  if (threadIdx.x == 0) last = atomicAdd(out.ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last || threadIdx.x != 0) return;
  *out.ticket = 0;  // ready for the next launch (and for graph replays)
  double total = 0.0;
  double tensor_acc = 0.0;
  for (int64_t c = 0; c < table.num_chunks; ++c) {
    tensor_acc = combine_acc(order, tensor_acc, out.partials[c].acc);
    const bool tensor_done = c + 1 == table.num_chunks || table.chunks[c + 1].tensor != table.chunks[c].tensor;
    if (tensor_done) {
      if (out.per_tensor != nullptr) out.per_tensor[table.chunks[c].tensor] = static_cast<float>(root_scaled(order, tensor_acc, 0));
      total = combine_acc(order, total, tensor_acc);
      tensor_acc = 0.0;
    }
  }
  const double norm = root_scaled(order, total, 0);
  *out.total = static_cast<float>(norm);
  if (out.coef != nullptr) *out.coef = static_cast<float>(clip_coefficient(max_norm, norm));
}

__global__ void __launch_bounds__(kThreads) scale_kernel(DeviceTable table, const float* coef) {
  const float c = *coef;
  if (c == 1.0f) return;  // the contract: no gradient bytes touched
  for (int64_t k = blockIdx.x; k < table.num_chunks; k += gridDim.x) {
    const Chunk ch = table.chunks[k];
    const TensorDesc t = table.tensors[ch.tensor];
    for (int64_t i = ch.begin + threadIdx.x; i < ch.begin + ch.size; i += kThreads) {
      switch (t.dtype) {
        case DType::kFloat32:
          static_cast<float*>(t.data)[i] *= c;
          break;
        case DType::kFloat64:
          static_cast<double*>(t.data)[i] *= static_cast<double>(c);
          break;
        case DType::kFloat16: {
          uint16_t* p = static_cast<uint16_t*>(t.data) + i;
          *p = float_to_half(half_to_float(*p) * c);
          break;
        }
        default: {
          uint16_t* p = static_cast<uint16_t*>(t.data) + i;
          *p = float_to_bf16(bf16_to_float(*p) * c);
        }
      }
    }
  }
}

int grid_size(int64_t num_chunks, int num_sms) {
  const int64_t wanted = static_cast<int64_t>(num_sms) * kBlocksPerSm;
  const int64_t blocks = num_chunks < wanted ? num_chunks : wanted;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

}  // namespace

cudaError_t launch_norm(const DeviceTable& table, NormOrder order, double max_norm, const NormOutputs& out,
                        int num_sms, cudaStream_t stream) {
  norm_kernel<<<grid_size(table.num_chunks, num_sms), kThreads, 0, stream>>>(table, order, max_norm, out);
  return cudaGetLastError();
}

cudaError_t launch_scale(const DeviceTable& table, const float* coef, int num_sms, cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  scale_kernel<<<grid_size(table.num_chunks, num_sms), kThreads, 0, stream>>>(table, coef);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastclip
