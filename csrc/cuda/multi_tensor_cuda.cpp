// fastclip CUDA glue: argument checks (shared with the CPU in ops.cpp),
// device guard, current stream, descriptor-table upload, launch checks and
// TORCH_LIBRARY_IMPL(fastclip, CUDA, m). The kernels are in
// multi_tensor_kernels.cu and never see ATen.
//
// Per call, on the tensors' current stream and without any host sync:
//   1. the descriptor table (TensorTable from ops.h) is written in C++ into a
//      pinned host tensor (torch's caching host allocator) and copied with
//      copy_(non_blocking=true). torch records the copy on the host block,
//      so the block is not reused before the copy has run. During CUDA-graph
//      capture the table goes to pinned memory of its own that is never
//      freed, so replays copy the same table again (which also re-zeroes
//      the ticket counters), whatever torch's host allocator does.
//   2. one device buffer from torch's caching allocator holds the table and
//      the norm scratch; its size depends only on the tensors' count and
//      sizes, never on values, so graph capture works.
//   3. norm: one launch; clip_: the norm launch, which leaves the
//      coefficient on the device, then the scale launch, which returns at
//      once when that coefficient is 1 (views with gaps, which gradients
//      almost never are, add a copy for reading and a strided scale launch;
//      entries that share bytes are scaled one launch each, in list order).
// The one host read: clip_ with error_if_nonfinite reads the non-finite
// flag before scaling (torch's clip_grad_norm_ syncs there as well).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../fastclip.h"
#include "../ops.h"
#include "multi_tensor_kernels.h"

namespace fastclip {
namespace cuda {
namespace {

// SMs of each device, queried once (sizes the persistent grids).
int sm_count(c10::DeviceIndex index) {
  static const std::vector<int> counts = [] {
    std::vector<int> out(static_cast<size_t>(c10::cuda::device_count()), 0);
    for (size_t i = 0; i < out.size(); ++i) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&out[i], cudaDevAttrMultiProcessorCount, static_cast<int>(i)));
    }
    return out;
  }();
  return counts.at(static_cast<size_t>(index));
}

// A table uploaded to the device, followed by `scratch_bytes` of scratch.
struct Upload {
  at::Tensor buffer;  // device bytes; keep alive until the launches are queued
  TableLayout layout;
  DeviceTable table;

  void* scratch() const { return static_cast<char*>(buffer.data_ptr()) + layout.bytes; }
  Ticket* tickets() const { return device_tickets(buffer.data_ptr(), layout); }
  // A typed view of `count` elements at `ptr` inside the buffer.
  at::Tensor view(const void* ptr, int64_t count, at::ScalarType type) const {
    const int64_t offset = static_cast<const char*>(ptr) - static_cast<const char*>(buffer.data_ptr());
    return buffer.narrow(0, offset, count * static_cast<int64_t>(at::elementSize(type))).view(type);
  }
};

enum class Scratch { kNone, kNorm };

cudaStream_t current_stream(const c10::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Pinned host memory for the table of a call made during CUDA-graph
// capture. The captured copy reads it again on every replay, so it must
// stay valid and unchanged as long as the graph may run. torch's caching
// host allocator reuses freed blocks (whether it spares blocks used during
// a capture depends on the torch version), so these come from
// cudaHostAlloc and are never freed: one table per captured call (about 40
// bytes per tensor), while a graph is captured once and replayed many times.
// Tables are packed into blocks of kCaptureBlockBytes: one cudaHostAlloc
// (a page at least, and a pinned mapping) per table cost a page per tensor
// where a list's entries share bytes and each gets a launch (found in review).
constexpr size_t kCaptureBlockBytes = size_t{1} << 20;
constexpr size_t kCaptureTableAlign = 64;  // a cache line; the table's fields need 8

void* capture_table_memory(size_t bytes) {
  static std::mutex mutex;
  static std::vector<void*> kept;  // for the life of the process
  static char* next = nullptr;     // the free part of the newest block
  static size_t left = 0;
  const size_t need = (bytes + kCaptureTableAlign - 1) / kCaptureTableAlign * kCaptureTableAlign;
  const std::lock_guard<std::mutex> lock(mutex);
  if (need > left) {
    const size_t block = std::max(need, kCaptureBlockBytes);
    void* ptr = nullptr;
    {
      // A host allocation is no stream work: relaxed mode allows it during a capture.
      const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      C10_CUDA_CHECK(cudaHostAlloc(&ptr, block, cudaHostAllocDefault));
    }
    kept.push_back(ptr);
    next = static_cast<char*>(ptr);
    left = block;
  }
  void* out = next;
  next += need;
  left -= need;
  return out;
}

Upload upload(const std::vector<TensorDesc>& descs, const c10::Device& device, Scratch scratch) {
  const auto n = static_cast<int64_t>(descs.size());
  const cudaStream_t stream = current_stream(device);
  const bool in_capture = capturing(stream);
  Upload up;
  up.layout = table_layout(n);
  const auto table_bytes = static_cast<int64_t>(up.layout.bytes);
  at::Tensor host;  // outside a capture: a block of torch's caching host allocator
  void* host_ptr = nullptr;
  if (in_capture) {
    host_ptr = capture_table_memory(static_cast<size_t>(table_bytes));
  } else {
    host = at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    host_ptr = host.data_ptr();
  }
  const int64_t chunks = build_table(descs.data(), n, up.layout, host_ptr);
  const int64_t extra = scratch == Scratch::kNorm ? static_cast<int64_t>(norm_scratch_bytes(n, chunks)) : 0;
  up.buffer = at::empty({table_bytes + extra}, at::TensorOptions().dtype(at::kByte).device(device));
  if (in_capture) {
    C10_CUDA_CHECK(cudaMemcpyAsync(up.buffer.data_ptr(), host_ptr, static_cast<size_t>(table_bytes),
                                   cudaMemcpyHostToDevice, stream));
  } else {
    // torch records the copy on the host block, which is not reused before it ran.
    up.buffer.narrow(0, 0, table_bytes).copy_(host, /*non_blocking=*/true);
  }
  up.table = device_table(up.buffer.data_ptr(), up.layout, n, chunks);
  return up;
}

// Norm outputs pointing into the upload's scratch; total, per_tensor and
// coef are set by the caller.
NormOutputs norm_outputs(const Upload& up) {
  NormOutputs out{};
  norm_scratch(up.scratch(), up.table.num_tensors, up.table.num_chunks, &out);
  out.tickets = up.tickets();
  return out;
}

// Scales the one dense entry `d` in a launch of its own.
void scale_one(const TensorDesc& d, const Coefficient& coef, const c10::Device& device, int sms, cudaStream_t stream) {
  const Upload one = upload(std::vector<TensorDesc>{d}, device, Scratch::kNone);
  launch_scale(one.table, coef, sms, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Scales the dense entries of `table`, whose flat table `up` holds (null:
// uploaded here, only where it is used): in one launch, or, where two
// entries share bytes (the same tensor listed twice, a view and its base),
// one launch per entry in list order, as the CPU writes them. In one launch two blocks would read and write the same
// elements at once: some scaled once, others twice, run to run; torch's
// loop scales such elements twice. (clamp_dense does the same.)
void scale_dense(const TensorTable& table, const Upload* up, const Coefficient& coef, const c10::Device& device,
                 int sms, cudaStream_t stream) {
  if (!table.spans_overlap()) {
    const Upload own = up != nullptr ? Upload{} : upload(table.descs(), device, Scratch::kNone);
    launch_scale((up != nullptr ? *up : own).table, coef, sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  for (const TensorDesc& d : table.descs()) {
    if (d.numel > 0) scale_one(d, coef, device, sms, stream);  // numel 0: empty, or a view with gaps (scale_views)
  }
}

// Scales the views with gaps that TensorTable leaves out of the flat table
// (`which`), batched into launch_scale_strided calls (one view per launch,
// in list order, where two views' extents meet: see scale_dense);
// the rare view of more than kMaxViewDims dimensions, and one whose
// elements may share an address, go to ATen with `aten_coef` (0-dim), out
// of place: the strided kernel's threads would scale a shared address at
// once, some twice (found in review: as_strided((N, 2), (1, 1))).
void scale_views(at::TensorList tensors, const std::vector<int64_t>& which, const Coefficient& coef,
                 const at::Tensor& aten_coef, int sms, cudaStream_t stream) {
  const int64_t per_launch = extents_meet(tensors, which) ? 1 : kMaxViewsPerLaunch;
  StridedViews batch{};
  const auto flush = [&] {
    launch_scale_strided(batch, coef, sms, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    batch.count = 0;
  };
  for (int64_t i : which) {
    const at::Tensor& t = tensors[static_cast<size_t>(i)];
    if (t.dim() > kMaxViewDims || may_share_elements(t)) {
      // Every element read before any is written; elements at one address
      // then write the same value. ATen would round a float64 device
      // coefficient to a 16-bit dtype before multiplying; the kernels
      // multiply by float(coef) and round once, which computing in float
      // reproduces.
      if (t.element_size() == 2) {
        t.copy_(t.to(at::kFloat).mul_(aten_coef.to(at::kFloat)));
      } else {
        t.copy_(t.mul(aten_coef));
      }
      continue;
    }
    StridedView& v = batch.views[batch.count++];
    v.data = t.data_ptr();
    v.numel = t.numel();
    v.dtype = to_dtype(t.scalar_type());
    v.dims = static_cast<int32_t>(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) {
      v.sizes[d] = t.size(d);
      v.strides[d] = t.stride(d);
    }
    if (batch.count == per_launch) flush();
  }
  if (batch.count > 0) flush();
}

// Writes every entry of `table` (made of `tensors`): `dense()` writes the
// entries without gaps, then `views(which)` the views with gaps; or, where
// a view with gaps reaches the bytes of a dense entry
// (TensorTable::gaps_reach_dense), one entry at a time in list order
// (`views({i})` or `one(desc)`), as the CPU does.
template <typename Dense, typename Views, typename One>
void for_each_write(at::TensorList tensors, const TensorTable& table, Dense dense, Views views, One one) {
  const std::vector<int64_t>& strided = table.strided();  // in list order
  if (!table.gaps_reach_dense(tensors)) {
    dense();
    if (!strided.empty()) views(strided);
    return;
  }
  size_t next_view = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (next_view < strided.size() && strided[next_view] == static_cast<int64_t>(i)) {
      views(std::vector<int64_t>{strided[next_view++]});
    } else if (table.descs()[i].numel > 0) {
      one(table.descs()[i]);
    }
  }
}

// Scales every entry of `table` (made of `tensors`), the dense ones through
// `up` where given (see for_each_write).
void scale_table(at::TensorList tensors, const TensorTable& table, const Upload* up, const Coefficient& coef,
                 const at::Tensor& aten_coef, const c10::Device& device, int sms, cudaStream_t stream) {
  for_each_write(
      tensors, table, [&] { scale_dense(table, up, coef, device, sms, stream); },
      [&](const std::vector<int64_t>& views) { scale_views(tensors, views, coef, aten_coef, sms, stream); },
      [&](const TensorDesc& d) { scale_one(d, coef, device, sms, stream); });
}

// The kernels load and store whole elements (and 16-byte vectors after a
// scalar head): data at an address that is no multiple of its element size
// (a storage offset in bytes, through set_() or a DLPack import) would
// fault with a misaligned address, which ends the CUDA context (found in
// review; the CPU takes data at any byte).
bool element_aligned(const at::Tensor& t) {
  const auto address = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return t.numel() == 0 || address % static_cast<uintptr_t>(t.element_size()) == 0;
}

// `name` and `index` (when not negative) name the argument in the error.
void check_element_aligned(const char* op, const char* name, const at::Tensor& t, int64_t index = -1) {
  if (element_aligned(t)) return;
  const std::string where = index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
  TORCH_CHECK(false, op, ": ", where, " starts at a byte address that is no multiple of its element size (",
              t.element_size(), " bytes); the CUDA kernels need element-aligned data: clone() it first");
}

void check_element_aligned(const char* op, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) check_element_aligned(op, "tensors", tensors[i], static_cast<int64_t>(i));
}

// Clamps `descs` (uploaded here) in one launch.
void clamp_descs(const std::vector<TensorDesc>& descs, double clip_value, const c10::Device& device, int sms,
                 cudaStream_t stream) {
  const Upload up = upload(descs, device, Scratch::kNone);
  launch_clamp(up.table, clip_value, sms, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Clamps the dense entries of `table`: in one launch, or, where two
// entries share bytes, one launch per entry in list order, as the CPU
// does. Clamping the same elements twice changes nothing in one dtype, but
// entries of different dtypes over the same bytes (a float32 gradient and
// its bfloat16 view) would be read and written at once by different blocks
// (found in review).
void clamp_dense(const TensorTable& table, double clip_value, const c10::Device& device, int sms,
                 cudaStream_t stream) {
  if (!table.spans_overlap()) {
    clamp_descs(table.descs(), clip_value, device, sms, stream);
    return;
  }
  for (const TensorDesc& d : table.descs()) {
    if (d.numel > 0) clamp_descs({d}, clip_value, device, sms, stream);  // numel 0: empty, or a view with gaps
  }
}

// Clamps the views with gaps `which` of `tensors` through contiguous copies
// and the same kernel, then copies them back: in one launch, or one view at
// a time in list order where two views' extents meet (a copy made before
// the other view's write-back would undo it). ATen's clamp_ (fminf/fmaxf)
// may give +0.0 where the kernels give -0.0 (a negative value clamped to a
// bound of 0).
void clamp_views(at::TensorList tensors, const std::vector<int64_t>& which, double clip_value,
                 const c10::Device& device, int sms, cudaStream_t stream) {
  if (which.size() > 1 && extents_meet(tensors, which)) {
    for (int64_t i : which) clamp_views(tensors, {i}, clip_value, device, sms, stream);
    return;
  }
  std::vector<at::Tensor> copies;
  for (int64_t i : which) copies.push_back(tensors[static_cast<size_t>(i)].contiguous());
  const TensorTable dense(copies, TensorTable::kWrite);
  clamp_descs(dense.descs(), clip_value, device, sms, stream);
  for (size_t k = 0; k < copies.size(); ++k) tensors[static_cast<size_t>(which[k])].copy_(copies[k]);
}

// ------------------------------------------------------------ the ops
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(at::TensorList tensors, double ord, bool per_tensor,
                                                          bool fp64, int64_t slices) {
  constexpr const char* kOp = "fastclip::multi_tensor_norm";
  check_tensors(kOp, tensors, c10::DeviceType::CUDA);
  check_element_aligned(kOp, tensors);
  check_norm_order(kOp, ord);
  check_slices(kOp, tensors, slices);
  TORCH_CHECK(!tensors.empty(), kOp, ": tensors is empty; the CUDA implementation needs a device");
  const c10::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const TensorTable table(tensors, slices);
  const auto n = static_cast<int64_t>(table.descs().size());
  const Upload up = upload(table.descs(), device, Scratch::kNorm);

  const at::TensorOptions options = at::TensorOptions().dtype(fp64 ? at::kDouble : at::kFloat).device(device);
  at::Tensor total = at::empty({}, options);
  at::Tensor each = at::empty({per_tensor ? n : 0}, options);
  NormOutputs out = norm_outputs(up);
  if (fp64) {
    out.total_fp64 = total.data_ptr<double>();
    out.per_tensor_fp64 = per_tensor ? each.data_ptr<double>() : nullptr;
  } else {
    out.total = total.data_ptr<float>();
    out.per_tensor = per_tensor ? each.data_ptr<float>() : nullptr;
  }
  out.coef = nullptr;
  out.nonfinite = nullptr;
  launch_norm(up.table, make_norm_order(ord), 0.0, out, sm_count(device.index()), current_stream(device));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {total, each};
}

void multi_tensor_scale_cuda(at::TensorList tensors, const at::Tensor& coef) {
  constexpr const char* kOp = "fastclip::multi_tensor_scale_";
  check_tensors(kOp, tensors, c10::DeviceType::CUDA);
  check_element_aligned(kOp, tensors);
  check_writable(kOp, tensors);
  if (tensors.empty()) return;
  const c10::Device device = tensors[0].device();
  check_coef(kOp, coef, device);
  const c10::cuda::CUDAGuard guard(device);

  Coefficient c{nullptr, DType::kFloat64, 1.0};
  at::Tensor coef_device;  // keeps a converted coefficient alive
  if (coef.is_cpu()) {
    c.host = coef.item<double>();  // a host value: no device sync
    if (c.host == 1.0) return;     // the contract: no memory traffic at all
  }
  const TensorTable table(tensors, TensorTable::kWrite);
  if (!coef.is_cpu()) {
    // Every block reads a device coefficient when it starts: one that lies
    // in a scaled tensor (scale_([a], a[0])) would be read after some block
    // scaled it (found in review); it is read from a copy then, queued on
    // the stream (no sync). Found by address: a second storage over the
    // same bytes (DLPack, set_ on a slice of the storage) is another
    // storage object (found in review). One at an odd byte address is
    // refused: its load would fault, in ATen's copy as in the kernels
    // (found in review).
    check_element_aligned(kOp, "coef", coef);
    coef_device = supported_dtype(coef.scalar_type()) && !table.reaches(tensors, coef)
                      ? coef
                      : coef.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
    c.device = coef_device.data_ptr();
    c.dtype = to_dtype(coef_device.scalar_type());
  }
  const int sms = sm_count(device.index());
  const cudaStream_t stream = current_stream(device);
  scale_table(tensors, table, nullptr, c, coef.is_cpu() ? coef.reshape({}) : coef_device.reshape({}), device, sms,
              stream);
  bump_versions(tensors);  // a device coefficient may be 1: the host cannot know, so it says "may have written"
}

void multi_tensor_clamp_cuda(at::TensorList tensors, double clip_value) {
  constexpr const char* kOp = "fastclip::multi_tensor_clamp_";
  check_tensors(kOp, tensors, c10::DeviceType::CUDA);
  check_element_aligned(kOp, tensors);
  check_writable(kOp, tensors);
  check_clip_value(kOp, clip_value);
  if (tensors.empty() || std::isinf(clip_value)) return;  // clamping to +-inf changes nothing
  const c10::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const int sms = sm_count(device.index());
  const cudaStream_t stream = current_stream(device);
  const TensorTable table(tensors, TensorTable::kWrite);
  for_each_write(
      tensors, table, [&] { clamp_dense(table, clip_value, device, sms, stream); },
      [&](const std::vector<int64_t>& views) { clamp_views(tensors, views, clip_value, device, sms, stream); },
      [&](const TensorDesc& d) { clamp_descs({d}, clip_value, device, sms, stream); });
  bump_versions(tensors);
}

at::Tensor clip_cuda(at::TensorList tensors, double max_norm, double ord, bool error_if_nonfinite) {
  constexpr const char* kOp = "fastclip::clip_";
  check_tensors(kOp, tensors, c10::DeviceType::CUDA);
  check_element_aligned(kOp, tensors);
  check_writable(kOp, tensors);
  check_max_norm(kOp, max_norm);
  check_norm_order(kOp, ord);
  TORCH_CHECK(!tensors.empty(), kOp, ": tensors is empty; the CUDA implementation needs a device");
  const c10::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const int sms = sm_count(device.index());
  const cudaStream_t stream = current_stream(device);
  // The check reads a flag on the host, which a capture cannot do: it would
  // end the capture with CUDA's own error (found in review).
  TORCH_CHECK(!(error_if_nonfinite && capturing(stream)), kOp,
              ": error_if_nonfinite=True reads the norm back on the host, which a CUDA graph capture cannot "
              "do (torch's clip_grad_norm_ cannot either); capture with error_if_nonfinite=False");

  // Dense tensors are read and written in place through one table; views
  // with gaps are read through contiguous copies (a second table) and
  // written through their strides (scale_views).
  const TensorTable write(tensors, TensorTable::kWrite);
  const bool all_dense = write.strided().empty();
  std::optional<TensorTable> read;  // alive until the norm is queued: it owns the copies
  if (!all_dense) read.emplace(tensors, TensorTable::kRead);
  const Upload up = upload(all_dense ? write.descs() : read->descs(), device, Scratch::kNorm);

  at::Tensor total = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  NormOutputs out = norm_outputs(up);
  out.total = total.data_ptr<float>();
  out.per_tensor = nullptr;
  launch_norm(up.table, make_norm_order(ord), max_norm, out, sms, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (error_if_nonfinite && up.view(out.nonfinite, 1, at::kInt).item<int32_t>() != 0) {
    raise_nonfinite_norm(ord);  // before anything is written
  }

  const Coefficient coef{out.coef, DType::kFloat64, 0.0};
  const at::Tensor aten_coef = all_dense ? at::Tensor() : up.view(out.coef, 1, at::kDouble).reshape({});
  scale_table(tensors, write, all_dense ? &up : nullptr, coef, aten_coef, device, sms, stream);
  bump_versions(tensors);  // the coefficient is decided on the device: "may have written"
  return total;
}

// A one-element tensor (checked) as a kernel Coefficient; `absent` when not given.
Coefficient scalar_arg(const std::optional<at::Tensor>& t, double absent) {
  if (!t.has_value()) return Coefficient{nullptr, DType::kFloat64, absent};
  return Coefficient{t->const_data_ptr(), to_dtype(t->scalar_type()), absent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_scalars_cuda(
    const at::Tensor& norm, double max_norm, const std::optional<at::Tensor>& loss_scale,
    const std::optional<at::Tensor>& extra_scale, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& extra_found, bool skip_inf_divisor, const at::Tensor& last_norm,
    const at::Tensor& last_coef, const at::Tensor& skipped, bool count_skip) {
  constexpr const char* kOp = "fastclip::clip_scalars_";
  check_clip_scalars(kOp, norm, max_norm, loss_scale, extra_scale, found_inf, extra_found, last_norm, last_coef,
                     skipped, c10::DeviceType::CUDA);
  const std::pair<const char*, const at::Tensor*> scalars[] = {
      {"norm", &norm}, {"last_norm", &last_norm}, {"last_coef", &last_coef}, {"skipped", &skipped}};
  for (const auto& [name, t] : scalars) check_element_aligned(kOp, name, *t);
  const std::pair<const char*, const std::optional<at::Tensor>*> optional[] = {
      {"loss_scale", &loss_scale},
      {"extra_scale", &extra_scale},
      {"found_inf", &found_inf},
      {"extra_found", &extra_found}};
  for (const auto& [name, t] : optional) {
    if (t->has_value()) check_element_aligned(kOp, name, **t);
  }
  const c10::Device device = norm.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto options = at::TensorOptions().device(device);
  at::Tensor factor = at::empty({}, options.dtype(at::kDouble));
  at::Tensor divisor = at::empty({}, options.dtype(at::kFloat));
  at::Tensor found = at::empty({}, options.dtype(at::kFloat));
  ClipScalarsArgs args{};
  args.norm = scalar_arg(norm, 0.0);
  args.loss_scale = scalar_arg(loss_scale, 1.0);
  args.extra_scale = scalar_arg(extra_scale, 1.0);
  args.found_inf = scalar_arg(found_inf, 0.0);
  args.extra_found = scalar_arg(extra_found, 0.0);
  args.max_norm = max_norm;
  args.skip_inf_divisor = skip_inf_divisor;
  args.count_skip = count_skip;
  args.last_norm = last_norm.data_ptr<float>();
  args.last_coef = last_coef.data_ptr<float>();
  args.skipped = skipped.data_ptr<int64_t>();
  args.factor = factor.data_ptr<double>();
  args.divisor = divisor.data_ptr<float>();
  args.found = found.data_ptr<float>();
  launch_clip_scalars(args, current_stream(device));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bump_clip_scalars(last_norm, last_coef, skipped, count_skip);
  return {factor, divisor, found};
}

}  // namespace
}  // namespace cuda
}  // namespace fastclip

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("multi_tensor_norm", &fastclip::cuda::multi_tensor_norm_cuda);
  m.impl("multi_tensor_scale_", &fastclip::cuda::multi_tensor_scale_cuda);
  m.impl("multi_tensor_clamp_", &fastclip::cuda::multi_tensor_clamp_cuda);
  m.impl("clip_", &fastclip::cuda::clip_cuda);
  m.impl("clip_scalars_", &fastclip::cuda::clip_scalars_cuda);
}
