// fastclip CPU kernels: one parallel pass over all tensors of a call.
//
// Work is the chunk list of fastclip.h (every tensor cut into pieces of at
// most kChunkElems elements), spread over ATen's intra-op threads balanced
// by element count. Each chunk writes its own partial; partials are then
// reduced in chunk order, so results are bitwise identical whatever the
// thread count. Accumulation is in double: squares of any finite float32
// are below 1.2e77 and cannot overflow, and 16-bit inputs are exact in
// float, so norms are accurate to float32 rounding for every input dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../fastclip.h"
#include "../ops.h"
#include "spans.h"

namespace fastclip {
namespace cpu {
namespace {

// 64 Ki elements (256 KiB of float32) per chunk: large enough that the
// per-chunk overhead vanishes, small enough that a big tensor splits
// evenly over threads and a chunk stays within the 1-2 MiB L2 of a core.
constexpr int64_t kChunkElems = int64_t{1} << 16;

// Below this many elements in a call, threads cost more than they save.
constexpr int64_t kMinParallelElems = int64_t{1} << 15;

// ----------------------------------------------------------- the driver
// Runs fn(c) for every chunk index, each exactly once, on ATen's threads.
// at::parallel_for cuts its range into equal contiguous pieces, so the
// range is elements, not chunks: a thread takes the chunks that start in
// its piece, and a few large tensors among many small ones still balance.
template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  const int64_t count = static_cast<int64_t>(chunks.size());
  std::vector<int64_t> start(chunks.size());
  int64_t total = 0;
  for (int64_t c = 0; c < count; ++c) {
    start[static_cast<size_t>(c)] = total;
    total += chunks[static_cast<size_t>(c)].size;
  }
  at::parallel_for(0, total, kMinParallelElems, [&](int64_t begin, int64_t end) {
    const auto first = std::lower_bound(start.begin(), start.end(), begin) - start.begin();
    for (int64_t c = first; c < count && start[static_cast<size_t>(c)] < end; ++c) fn(c);
  });
}

// Norm of every tensor and of all of them, with the rescue pass for power
// sums that left the double range.
NormReducer compute_norms(const std::vector<TensorDesc>& descs, const std::vector<Chunk>& chunks, NormOrder order) {
  std::vector<NormPartial> partials(chunks.size());
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[static_cast<size_t>(c)];
    const TensorDesc& d = descs[static_cast<size_t>(ch.tensor)];
    partials[static_cast<size_t>(c)] =
        norm_fn(d.dtype)(static_cast<const char*>(d.data) + ch.begin * dtype_size(d.dtype), ch.size, order, false, 0);
  });
  NormReducer reducer(order, static_cast<int64_t>(descs.size()));
  reducer.reduce(chunks, partials);

  bool tracks_max = order.kind == NormKind::kP;
  for (const TensorDesc& d : descs) tracks_max = tracks_max || d.dtype == DType::kFloat64;
  const std::vector<int64_t> rescue = reducer.tensors_to_rescue(tracks_max);
  if (!rescue.empty()) {
    std::vector<char> marked(descs.size(), 0);
    for (int64_t t : rescue) marked[static_cast<size_t>(t)] = 1;
    std::vector<Chunk> again;
    for (const Chunk& ch : chunks)
      if (marked[static_cast<size_t>(ch.tensor)]) again.push_back(ch);
    std::vector<NormPartial> again_partials(again.size());
    for_each_chunk(again, [&](int64_t c) {
      const Chunk& ch = again[static_cast<size_t>(c)];
      const TensorDesc& d = descs[static_cast<size_t>(ch.tensor)];
      again_partials[static_cast<size_t>(c)] =
          norm_fn(d.dtype)(static_cast<const char*>(d.data) + ch.begin * dtype_size(d.dtype), ch.size, order,
                           true, reducer.exponent(ch.tensor));
    });
    reducer.reduce(again, again_partials);
  }
  return reducer;
}

void update_all(const std::vector<TensorDesc>& descs, const std::vector<Chunk>& chunks, UpdateSpanFn (*pick)(DType),
                double value) {
  for_each_chunk(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[static_cast<size_t>(c)];
    const TensorDesc& d = descs[static_cast<size_t>(ch.tensor)];
    pick(d.dtype)(static_cast<char*>(d.data) + ch.begin * dtype_size(d.dtype), ch.size, value);
  });
}

// In-place update of a list by a host value; views with gaps go to ATen.
void update_tensors(at::TensorList tensors, UpdateSpanFn (*pick)(DType), double value,
                    void (*aten_update)(const at::Tensor&, double)) {
  const TensorTable table(tensors, TensorTable::kWrite);
  update_all(table.descs(), plan_chunks(table.descs(), kChunkElems), pick, value);
  for (int64_t i : table.strided()) aten_update(tensors[static_cast<size_t>(i)], value);
  bump_versions(tensors);
}

void aten_scale(const at::Tensor& t, double coef) { t.mul_(coef); }
void aten_clamp(const at::Tensor& t, double bound) { t.clamp_(-bound, bound); }

// In-place scale of a list by a host value.
void scale_tensors(at::TensorList tensors, double coef) {
  if (coef == 1.0) return;  // the contract: no memory traffic at all
  update_tensors(tensors, scale_fn, coef, aten_scale);
}

at::Tensor scalar_float(double v) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *out.data_ptr<float>() = static_cast<float>(v);
  return out;
}

// ------------------------------------------------------------ the ops
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList tensors, double ord, bool per_tensor) {
  constexpr const char* kOp = "fastclip::multi_tensor_norm";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_norm_order(kOp, ord);
  const TensorTable table(tensors, TensorTable::kRead);
  const NormReducer norms =
      compute_norms(table.descs(), plan_chunks(table.descs(), kChunkElems), make_norm_order(ord));
  const int64_t n = static_cast<int64_t>(tensors.size());
  at::Tensor each = at::empty({per_tensor ? n : 0}, at::TensorOptions().dtype(at::kFloat));
  if (per_tensor) {
    float* out = each.data_ptr<float>();
    for (int64_t t = 0; t < n; ++t) out[t] = static_cast<float>(norms.tensor_norm(t));
  }
  return {scalar_float(norms.total_norm()), each};
}

void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& coef) {
  constexpr const char* kOp = "fastclip::multi_tensor_scale_";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_writable(kOp, tensors);
  check_coef(kOp, coef, c10::Device(c10::DeviceType::CPU));
  scale_tensors(tensors, coef.item<double>());
}

void multi_tensor_clamp_cpu(at::TensorList tensors, double clip_value) {
  constexpr const char* kOp = "fastclip::multi_tensor_clamp_";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_writable(kOp, tensors);
  check_clip_value(kOp, clip_value);
  if (std::isinf(clip_value)) return;  // clamping to +-inf changes nothing
  update_tensors(tensors, clamp_fn, clip_value, aten_clamp);
}

at::Tensor clip_cpu(at::TensorList tensors, double max_norm, double ord, bool error_if_nonfinite) {
  constexpr const char* kOp = "fastclip::clip_";
  check_tensors(kOp, tensors, c10::DeviceType::CPU);
  check_writable(kOp, tensors);
  check_max_norm(kOp, max_norm);
  check_norm_order(kOp, ord);
  const TensorTable table(tensors, TensorTable::kRead);
  const std::vector<Chunk> chunks = plan_chunks(table.descs(), kChunkElems);
  const double total = compute_norms(table.descs(), chunks, make_norm_order(ord)).total_norm();
  if (error_if_nonfinite) check_norm_finite(total, ord);
  // The coefficient comes from the double norm: it stays right even when
  // the norm itself is beyond float32 range.
  const double coef = clip_coefficient(max_norm, total);
  if (coef == 1.0) return scalar_float(total);  // the contract: no memory traffic at all
  if (table.in_place()) {
    // Every tensor was read in place: the same table and chunks serve the
    // scale pass (the common case; no second walk over the tensors).
    update_all(table.descs(), chunks, scale_fn, coef);
    bump_versions(tensors);
  } else {
    scale_tensors(tensors, coef);
  }
  return scalar_float(total);
}

}  // namespace
}  // namespace cpu
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("multi_tensor_norm", &fastclip::cpu::multi_tensor_norm_cpu);
  m.impl("multi_tensor_scale_", &fastclip::cpu::multi_tensor_scale_cpu);
  m.impl("multi_tensor_clamp_", &fastclip::cpu::multi_tensor_clamp_cpu);
  m.impl("clip_", &fastclip::cpu::clip_cpu);
}
