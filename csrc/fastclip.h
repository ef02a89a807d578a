// fastclip: framework-free declarations shared by the CPU and CUDA kernels.
//
// Nothing here knows about ATen: the torch glue (ops.cpp) turns a list of
// tensors into a table of TensorDesc, splits it into Chunks, and hands raw
// pointers and sizes to the kernels. Every size and offset is 64-bit.
#pragma once

#include <cstdint>
#include <vector>

#include "numerics.h"

namespace fastclip {

// Element types the kernels read and write. Values are stable: the CUDA
// descriptor table stores them as int32.
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline int64_t dtype_size(DType d) {
  return d == DType::kFloat64 ? 8 : (d == DType::kFloat32 ? 4 : 2);
}

// One tensor seen as a flat array: the glue only builds these for tensors
// that are non-overlapping and dense, whose elements fill
// [data, data + numel) in some order. Norm, scale and clamp do not depend
// on element order, so any dense layout (transposed, channels-last) works.
struct TensorDesc {
  void* data;      // first element in memory (not necessarily index 0)
  int64_t numel;   // number of elements
  DType dtype;     // element type
};

// A piece of one tensor: the unit of parallel work and of partial results.
// Chunks of one tensor are consecutive in the chunk list, in memory order,
// so per-tensor results are reduced from consecutive partials in a fixed
// order, independent of how many threads ran.
struct Chunk {
  int64_t tensor;  // index into the TensorDesc table
  int64_t begin;   // first element of the chunk within the tensor
  int64_t size;    // number of elements, 1 <= size <= chunk_elems
};

// Splits every non-empty tensor into chunks of at most chunk_elems elements.
// Empty tensors produce no chunk (their norm is 0 and nothing is scaled).
inline std::vector<Chunk> plan_chunks(const std::vector<TensorDesc>& tensors,
                                      int64_t chunk_elems) {
  int64_t count = 0;
  for (const TensorDesc& t : tensors) count += (t.numel + chunk_elems - 1) / chunk_elems;
  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[static_cast<size_t>(i)].numel;
    for (int64_t begin = 0; begin < n; begin += chunk_elems) {
      const int64_t size = n - begin < chunk_elems ? n - begin : chunk_elems;
      chunks.push_back(Chunk{i, begin, size});
    }
  }
  return chunks;
}

// Host-side reduction of chunk partials into per-tensor and total norms.
// It owns the overflow/underflow rescue decision (see numerics.h); the
// caller re-runs the chunks of the tensors it marks, dividing their values
// by the tensor's scale, and reduces those partials again.
class NormReducer {
 public:
  NormReducer(NormOrder order, int64_t num_tensors)
      : order_(order),
        tensor_acc_(static_cast<size_t>(num_tensors), 0.0),
        tensor_amax_(static_cast<size_t>(num_tensors), 0.0),
        tensor_scale_(static_cast<size_t>(num_tensors), 1.0) {}

  // Folds the partials of consecutive chunks into their tensors, in order.
  void reduce(const std::vector<Chunk>& chunks, const std::vector<NormPartial>& partials) {
    for (size_t c = 0; c < chunks.size(); ++c) {
      const size_t t = static_cast<size_t>(chunks[c].tensor);
      tensor_acc_[t] = combine_acc(order_, tensor_acc_[t], partials[c].acc);
      tensor_amax_[t] = nan_max(tensor_amax_[t], partials[c].amax);
    }
  }

  // Tensors whose power sums left the safe range and must be recomputed
  // with their values divided by a scale (numerics.h: rescue_scale); sets
  // that scale. Empty when none.
  // tracks_max says whether the first pass recorded max |x| (it only does
  // where a rescue is possible at all: fp64 data or a general p).
  std::vector<int64_t> tensors_to_rescue(bool tracks_max) {
    std::vector<int64_t> out;
    if (!tracks_max || order_.kind == NormKind::kInf) return out;
    double total = 0.0;
    for (double a : tensor_acc_) total += a;
    const bool total_overflowed = sum_overflowed(order_, total);
    for (size_t t = 0; t < tensor_acc_.size(); ++t) {
      if (needs_rescue(order_, tensor_acc_[t], tensor_amax_[t], total_overflowed)) {
        tensor_scale_[t] = rescue_scale(order_, tensor_amax_[t]);
        tensor_acc_[t] = 0.0;
        out.push_back(static_cast<int64_t>(t));
      }
    }
    return out;
  }

  // Per-tensor norm t (after any rescue pass was folded in).
  double tensor_norm(int64_t t) const {
    const size_t i = static_cast<size_t>(t);
    return root_scaled(order_, tensor_acc_[i], tensor_scale_[i]);
  }

  // Total norm over all tensors, combined in tensor order.
  double total_norm() const {
    return combine_scaled(order_, tensor_acc_.data(), tensor_scale_.data(),
                          static_cast<int64_t>(tensor_acc_.size()));
  }

  // What tensor t's values are divided by in the rescue pass (1 if none).
  double scale(int64_t t) const { return tensor_scale_[static_cast<size_t>(t)]; }

 private:
  NormOrder order_;
  std::vector<double> tensor_acc_;
  std::vector<double> tensor_amax_;
  std::vector<double> tensor_scale_;
};

}  // namespace fastclip
