// fastclip CUDA launchers: framework-free declarations (no ATen). The
// torch glue (multi_tensor_cuda.cpp) builds the descriptor table on the
// host with build_table(), uploads it, and passes raw device pointers here.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../fastclip.h"

namespace fastclip {
namespace cuda {

// 64 Ki elements per chunk (128-512 KiB): on an H200 (132 SMs x 4 blocks)
// a 5 GB gradient list is ~18,000 chunks, so the last round of the grid is
// a small fraction of the work, while the per-chunk cost (tensor lookup,
// block reduction, one partial) is negligible next to reading the chunk.
constexpr int64_t kChunkElems = int64_t{1} << 16;

// Threads per block of every kernel: 8 warps keep loads in flight and make
// the block reductions two short shuffle stages.
constexpr int kThreads = 256;

// Resident blocks per SM that the kernels are compiled for
// (__launch_bounds__: at most 64 registers per thread); the grid is
// num_sms * kBlocksPerSm blocks at most, a persistent grid that walks the
// chunk list. 4 x 256 threads with four 16-byte loads in flight each is
// 64 KiB in flight per SM, more than the ~25 KiB per SM that the H200's
// bandwidth-latency product requires. (The general-order norm, bound by
// pow(), uses half as many.)
constexpr int kBlocksPerSm = 4;

// A power sum of values scaled by `scale`: the sum of (|x| / scale)^p, so
// the norm is scale * sum^(1/p) (numerics.h: root_scaled). Plain float64
// sums (fp32/fp16/bf16 with p = 1 or 2, and the inf-norm, whose sums cannot
// leave the double range) have scale 1. fp64 data with p = 1, 2 is scaled
// by a power of two above every |x| seen (exact; 2^1023 at most, which
// leaves values near the double maximum in [1, 2)); a general order p by
// the largest |x| seen, whose term is then exactly 1. Either way the sum
// can neither overflow nor lose digits that matter to underflow.
struct ScaledSum {
  double sum;
  double scale;
};

// The descriptor table of one call, in device memory. chunk_start[t] is
// the index of tensor t's first chunk (chunk_start[num_tensors] is the
// number of chunks); chunk c of tensor t covers elements
// [(c - chunk_start[t]) * kChunkElems, ...) of it. Empty tensors own no chunk.
struct DeviceTable {
  const TensorDesc* tensors;
  const int64_t* chunk_start;  // num_tensors + 1 entries
  int64_t num_tensors;
  int64_t num_chunks;
};

// Byte layout of the table as built on the host and copied to the device
// in one transfer: descriptors, chunk starts, then zeroed ticket counters
// (one per tensor and one for the grid) that the norm kernel counts with.
// Uploading zeros with the table resets the counters on every call and on
// every CUDA-graph replay without a memset launch.
// Chunk counters: 64-bit like every count here (atomicAdd supports it).
using Ticket = unsigned long long;

struct TableLayout {
  size_t tensors;       // offset of TensorDesc[num_tensors]
  size_t chunk_start;   // offset of int64_t[num_tensors + 1]
  size_t tickets;       // offset of Ticket[num_tensors + 1]; the last is the grid's
  size_t bytes;         // total size
};

TableLayout table_layout(int64_t num_tensors);

// Writes the table for `descs` into `host` (layout.bytes bytes) and returns
// the number of chunks.
int64_t build_table(const TensorDesc* descs, int64_t num_tensors, const TableLayout& layout, void* host);

// Device pointers into an uploaded table.
DeviceTable device_table(const void* device, const TableLayout& layout, int64_t num_tensors, int64_t num_chunks);
Ticket* device_tickets(void* device, const TableLayout& layout);

// Scratch and results of launch_norm (device memory).
struct NormOutputs {
  ScaledSum* chunk_partials;  // scratch, num_chunks entries
  ScaledSum* tensor_sums;     // scratch, num_tensors entries
  Ticket* tickets;            // num_tensors + 1 counters, zero on entry and left at zero
  float* total;               // the total norm, or nullptr
  double* total_fp64;         // the total norm in float64 (not rounded to float32), or nullptr
  float* per_tensor;          // num_tensors norms, or nullptr
  double* per_tensor_fp64;    // num_tensors norms in float64, or nullptr
  double* coef;               // min(1, max_norm / (norm + 1e-6)) from the float64 norm, or nullptr
  int32_t* nonfinite;         // 1 when the float64 total norm is NaN or inf, else 0; or nullptr
};

// Device bytes launch_norm needs next to the table: chunk partials, tensor
// sums, the coefficient and the non-finite flag.
size_t norm_scratch_bytes(int64_t num_tensors, int64_t num_chunks);
// Points chunk_partials, tensor_sums, coef and nonfinite into `scratch`.
void norm_scratch(void* scratch, int64_t num_tensors, int64_t num_chunks, NormOutputs* out);

// The coefficient of launch_scale: read on the device from `device`
// (of dtype `dtype`) when it is not null, else `host`.
struct Coefficient {
  const void* device;
  DType dtype;
  double host;
};

// Grid of a kernel over `num_chunks` chunks on a GPU with `num_sms` SMs:
// one block per chunk up to blocks_per_sm resident blocks per SM.
int grid_size(int64_t num_chunks, int num_sms, int blocks_per_sm);

// Norm of all tensors in one launch, whatever their number and dtypes;
// per-tensor norms, the clip coefficient and the non-finite flag come out
// of the same launch. Bitwise reproducible (fixed reduction order,
// independent of the grid size). Always launches (an empty table still
// writes a zero norm).
void launch_norm(const DeviceTable& table, NormOrder order, double max_norm, const NormOutputs& out, int num_sms,
                 cudaStream_t stream);

// tensors *= coefficient in place; with a device coefficient equal to 1 the
// kernel reads it and returns without touching the tensors. No launch for
// an empty table.
void launch_scale(const DeviceTable& table, const Coefficient& coef, int num_sms, cudaStream_t stream);

// Views with gaps (not dense: x[:, ::2]) cannot be chunked as flat spans;
// launch_scale_strided writes them element by element through their
// strides, so that a coefficient of 1 touches none of their bytes either.
// Up to kMaxViewsPerLaunch views of up to kMaxViewDims dimensions go in one
// launch as a kernel argument (2.5 KB, under the 4 KB parameter limit).
constexpr int kMaxViewDims = 8;
constexpr int kMaxViewsPerLaunch = 16;

struct StridedView {
  void* data;  // element at index (0, ..., 0)
  int64_t numel;
  DType dtype;
  int32_t dims;
  int64_t sizes[kMaxViewDims];
  int64_t strides[kMaxViewDims];  // in elements
};

struct StridedViews {
  StridedView views[kMaxViewsPerLaunch];
  int32_t count;
};

// views *= coefficient in place, with the same early exit as launch_scale.
void launch_scale_strided(const StridedViews& views, const Coefficient& coef, int num_sms, cudaStream_t stream);

// tensors = clamp(tensors, -bound, bound) in place; NaN stays NaN.
void launch_clamp(const DeviceTable& table, double bound, int num_sms, cudaStream_t stream);

// The clip_scalars_ op (step_scalars in numerics.h) in one thread on the
// device. The inputs are read as Coefficients: an absent scale is the host
// value 1, an absent flag 0. Pointers are device memory.
struct ClipScalarsArgs {
  Coefficient norm, loss_scale, extra_scale, found_inf, extra_found;
  double max_norm;
  bool skip_inf_divisor;
  bool count_skip;  // add the flag to *skipped
  float* last_norm;
  float* last_coef;
  int64_t* skipped;
  double* factor;
  float* divisor;
  float* found;
};
void launch_clip_scalars(const ClipScalarsArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastclip
