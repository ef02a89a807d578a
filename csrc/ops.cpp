// fastclip: the op schemas (the one place they are declared), the argument
// checks every device implementation shares, and the ops' Autograd kernels.
// The Python module that calls the ops is in python.cpp.
#include "ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/COW.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <string>
#include <type_traits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace fastclip {

namespace {
// Set in a child made by fork(): GNU OpenMP's worker threads do not
// survive fork, and a parallel region in the child waits for them forever
// when the parent had started them (found in review: a child clipping 100
// gradients of 1,000 elements hung, where torch, which runs tensors that
// small serially, did not; torch's own ops hang on large tensors there,
// and DataLoader workers run on one thread). A forked child runs every
// call on its calling thread.
std::atomic<bool> forked_child{false};
[[maybe_unused]] const bool fork_handler_registered = [] {
#if defined(__unix__) || defined(__APPLE__)
  pthread_atfork(nullptr, nullptr, [] { forked_child.store(true, std::memory_order_relaxed); });
#endif
  return true;
}();

// Lists at least this long have their per-tensor metadata walks (the
// table with the checks, the version bumps) split over ATen's threads:
// each tensor's TensorImpl, StorageImpl and version counter are separate
// objects, cold after the passes, and every core adds its own outstanding
// misses and page walks (10,000 gradients, 2 threads: the bf16 clip
// 12.2-14.1 -> 11.2-12.4 ms; 1,100 gradients: the same either way).
constexpr int64_t kParallelWalkTensors = 1024;

// fn(begin, end) over index ranges of [0, n): one call on this thread for
// a short list, else ranges on ATen's threads. fn only reads metadata and
// bumps atomic counters: no reference count changes (a tensor's may
// reach its Python object's, which needs the GIL), nothing that reads
// the caller's thread-local state (InferenceMode, warning handlers), and
// it catches its own exceptions so that errors come in list order.
template <typename Fn>
void walk_tensors(int64_t n, const Fn& fn) {
  if (n < kParallelWalkTensors || host_runs_serially()) {
    fn(int64_t{0}, n);
    return;
  }
  at::parallel_for(0, n, kParallelWalkTensors / 2, fn);
}
}  // namespace

bool host_runs_serially() {
  return at::get_num_threads() <= 1 || at::in_parallel_region() || forked_child.load(std::memory_order_relaxed);
}

bool dual_level_active() {
  constexpr uint64_t kOuterLevel = 0;  // levels are a stack from 0
  return torch::autograd::ForwardADLevel::try_get_by_idx(kOuterLevel) != nullptr;
}

bool has_tangent(const at::Tensor& t) {
  if (!t.defined()) return false;
  for (uint64_t level = 0; torch::autograd::ForwardADLevel::try_get_by_idx(level); ++level) {
    if (t._fw_grad(level).defined()) return true;
  }
  return false;
}

int64_t first_with_tangent(at::TensorList tensors) {
  if (!dual_level_active()) return -1;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (has_tangent(tensors[i])) return static_cast<int64_t>(i);
  }
  return -1;
}

// Forward-mode AD: an op that ignored the tangents would return a norm
// without one and leave a written tensor's tangent stale (found in review:
// clip_grad_value_ left it, where torch clamps it with its primal).
const char* const kTangentRefused =
    " carries a forward-mode AD tangent, which the op does not propagate (fastclip's clip and norm functions "
    "take such tensors through plain PyTorch; ClippedOptimizer does not take them)";

void check_no_tangent(const char* op, at::TensorList tensors) {
  const int64_t i = first_with_tangent(tensors);
  TORCH_CHECK(i < 0, op, ": tensors[", i, "]", kTangentRefused);
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastclip: unsupported dtype ", t);
  }
}

void check_tensors(const char* op, at::TensorList tensors, c10::DeviceType device_type) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": tensors[", i, "] is an undefined tensor");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", i, "] has layout ", t.layout(),
                "; the kernels take dense (strided) tensors");
    TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": tensors[", i, "] has dtype ",
                t.scalar_type(), "; supported dtypes are float32, float64, float16 and bfloat16");
    TORCH_CHECK(t.device() == tensors[0].device(), op, ": tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", tensors[0].device(),
                "; pass one list per device (fastclip's Python functions group them)");
    TORCH_CHECK(t.device().type() == device_type, op, ": tensors[", i, "] is on ", t.device(),
                ", which this implementation does not serve");
  }
}

namespace {
// Whether a storage replaces its memory on the first mutable access
// (copy-on-write): torch 2.13 marks it with a materializer, torch 2.11 only
// with its DataPtr's deleter (found building against 2.11: it has no
// has_materializer). The overload taking an int exists where the method does.
template <typename Storage>
auto has_materializer(const Storage& s, int) -> decltype(s.has_materializer()) {
  return s.has_materializer();
}
template <typename Storage>
bool has_materializer(const Storage&, long) {
  return false;
}
bool materializes(const c10::StorageImpl& s) {
  return has_materializer(s, 0) || c10::impl::cow::is_cow_data_ptr(s.data_ptr());
}

// Every element of `t` (numel > 0) lies in its storage's allocation.
bool within_storage(const at::Tensor& t, const c10::StorageImpl* storage) {
  if (storage == nullptr || storage->data() == nullptr) return false;
  int64_t last = t.storage_offset();  // the farthest element, in elements (strides are >= 0)
  const at::IntArrayRef sizes = t.sizes(), strides = t.strides();  // no dim wrapping per dim
  for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
  return (last + 1) * static_cast<int64_t>(t.element_size()) <= static_cast<int64_t>(storage->nbytes());
}
}  // namespace

const char* unwritable_reason(const at::Tensor& t) {
  // Every layout (a sparse gradient goes to the fallback, whose write would
  // refuse an inference tensor after the kernels' part was written).
  if (!c10::InferenceMode::is_enabled() && t.is_inference()) return "inference";
  // A __torch_dispatch__ subclass (FakeTensor, a wrapper of other tensors)
  // has no memory of its own to check: the torch ops it runs check theirs
  // (found in review: its empty storage was reported as freed).
  if (t.unsafeGetTensorImpl()->is_python_dispatch()) return nullptr;
  // So has torch.func.functionalize's wrapper (its storage is not memory),
  // torch.vmap's batched tensor (found in review: the check of its storage
  // failed the in-place functions under vmap) and the wrapper of
  // torch.func's grad and jvp (its storage cannot be accessed: the
  // functions failed on it under vmap(jvp(f))).
  constexpr c10::DispatchKeySet kWrappers({c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                           c10::DispatchKey::BatchedNestedTensor,
                                           c10::DispatchKey::FuncTorchGradWrapper});
  if (t.key_set().has_any(kWrappers)) return nullptr;
  if (t.layout() != at::kStrided) return nullptr;
  if (!t.is_non_overlapping_and_dense() && at::has_internal_overlap(t) == at::MemOverlap::Yes) return "overlap";
  if (t.numel() > 0 && t.device().type() != c10::DeviceType::Meta &&
      !within_storage(t, t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl())) {
    return "storage";
  }
  return nullptr;
}

void check_writable(const char* op, at::TensorList tensors) {
  const bool inference_mode = c10::InferenceMode::is_enabled();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(inference_mode || !t.is_inference(), op, ": tensors[", i,
                "] is an inference tensor, and an inplace update to an inference tensor outside InferenceMode "
                "is not allowed (as in torch); clone() it first or call this under torch.inference_mode()");
    if (t.is_non_overlapping_and_dense()) continue;  // the common case, one flag
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": tensors[", i,
                "] has elements that share memory (an expand()ed view?), so it cannot be written in place; "
                "clone() it first");
  }
}

void check_norm_order(const char* op, double ord) {
  TORCH_CHECK(ord > 0.0, op, ": ord must be a positive number or inf, got ", ord);
}

void check_slices(const char* op, at::TensorList tensors, int64_t slices) {
  TORCH_CHECK(slices >= 1, op, ": slices must be at least 1, got ", slices);
  if (slices == 1) return;  // every tensor whole, of any shape
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    // Symbolic sizes under torch.compile's dynamic shapes: a guard, not an error.
    TORCH_CHECK(t.dim() >= 1 && t.sym_size(0) == slices, op, ": tensors[", i, "] has shape ", t.sym_sizes(),
                ", but slices=", slices, " takes every tensor as that many slices along its first dimension");
  }
}

void check_max_norm(const char* op, double max_norm) {
  TORCH_CHECK(std::isfinite(max_norm) && max_norm >= 0.0, op,
              ": max_norm must be a finite number >= 0, got ", max_norm);
}

void check_clip_value(const char* op, double clip_value) {
  TORCH_CHECK(clip_value >= 0.0, op, ": clip_value must be a number >= 0, got ", clip_value);
}

void check_norm_finite(double norm, double ord) {
  if (!std::isfinite(norm)) raise_nonfinite_norm(ord);
}

void raise_nonfinite_norm(double ord) {
  // The order as Python prints a float (torch's message uses f"{norm_type}"):
  // the fewest digits that read back as it, with an exponent from 1e16 up
  // (found in review: %g wrote 1e16 + 2 without one), ".0" after an integer.
  constexpr double kPythonExponentFrom = 1e16;
  const bool exponent = std::fabs(ord) >= kPythonExponentFrom;
  std::string order;
  if (std::isinf(ord)) {
    order = "inf";
  } else if (ord == std::floor(ord) && !exponent) {
    order = std::to_string(static_cast<int64_t>(ord)) + ".0";
  } else {
    char buf[32];
    for (int digits = 1; digits <= 17; ++digits) {
      if (exponent) {
        std::snprintf(buf, sizeof(buf), "%.*e", digits - 1, ord);
      } else {
        std::snprintf(buf, sizeof(buf), "%.*g", digits, ord);
      }
      if (std::strtod(buf, nullptr) == ord) break;
    }
    order = buf;
  }
  TORCH_CHECK(false, "The total norm of order ", order,
              " for gradients from `parameters` is non-finite, so it cannot be clipped. To disable this error "
              "and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`");
}

namespace {
void check_scalar_memory(const char* op, const char* name, const at::Tensor& t) {
  // Read or written through its data pointer (found in review: a storage
  // resized to 0 under it segfaulted). Not a subclass's or a meta tensor:
  // they have no memory of their own to check.
  const bool has_memory = !t.unsafeGetTensorImpl()->is_python_dispatch() && t.device().type() != c10::DeviceType::Meta;
  TORCH_CHECK(!has_memory || within_storage(t, t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl()),
              op, ": ", name, " has its element beyond the memory of its storage (was it resized or freed?)");
}
}  // namespace

void check_coef(const char* op, const at::Tensor& coef, const c10::Device& device) {
  TORCH_CHECK(coef.defined() && coef.numel() == 1, op,
              ": coef must be a tensor with one element, got ",
              coef.defined() ? coef.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(coef.scalar_type()), op,
              ": coef must be a floating-point tensor, got ", coef.scalar_type());
  TORCH_CHECK(coef.device().is_cpu() || coef.device() == device, op, ": coef is on ",
              coef.device(), " but the tensors are on ", device);
  TORCH_CHECK(coef.layout() == at::kStrided, op, ": coef has layout ", coef.layout(), "; a dense tensor is needed");
  // Found in review: a coef past its shrunk storage scaled by stale memory.
  check_scalar_memory(op, "coef", coef);
}

namespace {
// `t` (named `name`) has one element, of dtype `dtype` when given, else a
// dtype the kernels read, and is on `device`.
void check_scalar(const char* op, const char* name, const at::Tensor& t, const c10::Device& device,
                  std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(t.defined() && t.numel() == 1, op, ": ", name, " must be a tensor with one element, got ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " has layout ", t.layout(), "; a dense tensor is needed");
  if (dtype.has_value()) {
    TORCH_CHECK(t.scalar_type() == *dtype, op, ": ", name, " must be a ", *dtype, " tensor, got ", t.scalar_type());
  } else {
    TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name, " has dtype ", t.scalar_type(),
                "; supported dtypes are float32, float64, float16 and bfloat16");
  }
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but norm is on ", device);
  check_scalar_memory(op, name, t);
}
}  // namespace

void check_clip_scalars(const char* op, const at::Tensor& norm, double max_norm,
                        const std::optional<at::Tensor>& loss_scale, const std::optional<at::Tensor>& extra_scale,
                        const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& extra_found,
                        const at::Tensor& last_norm, const at::Tensor& last_coef, const at::Tensor& skipped,
                        c10::DeviceType device_type) {
  TORCH_CHECK(norm.defined(), op, ": norm is an undefined tensor");
  const c10::Device device = norm.device();
  TORCH_CHECK(device.type() == device_type, op, ": norm is on ", device, ", which this implementation does not serve");
  check_scalar(op, "norm", norm, device, std::nullopt);
  check_max_norm(op, max_norm);
  const std::pair<const char*, const std::optional<at::Tensor>*> inputs[] = {
      {"loss_scale", &loss_scale}, {"extra_scale", &extra_scale}, {"found_inf", &found_inf}, {"extra_found", &extra_found}};
  for (const auto& [name, t] : inputs) {
    if (t->has_value()) check_scalar(op, name, **t, device, std::nullopt);
  }
  check_scalar(op, "last_norm", last_norm, device, at::kFloat);
  check_scalar(op, "last_coef", last_coef, device, at::kFloat);
  check_scalar(op, "skipped", skipped, device, at::kLong);
  const bool inference_mode = c10::InferenceMode::is_enabled();
  const std::pair<const char*, const at::Tensor*> written[] = {
      {"last_norm", &last_norm}, {"last_coef", &last_coef}, {"skipped", &skipped}};
  for (const auto& [name, t] : written) {
    TORCH_CHECK(inference_mode || !t->is_inference(), op, ": ", name,
                " is an inference tensor, and an inplace update to an inference tensor outside InferenceMode "
                "is not allowed (as in torch)");
  }
}

namespace {
// A storage resized under a tensor (untyped_storage().resize_(0), as FSDP
// frees parameters) can leave its elements without memory.
void check_in_storage(const at::Tensor& t, size_t i, const c10::StorageImpl* storage) {
  TORCH_CHECK(t.numel() == 0 || within_storage(t, storage), "fastclip: tensors[", i,
              "] has elements beyond the memory of its storage (",
              storage == nullptr ? int64_t{0} : static_cast<int64_t>(storage->nbytes()),
              " bytes; was it resized or freed?)");
}

// Where a slice read through a copy starts: a fresh allocation's alignment
// as far as the CUDA kernels look (their 16-byte vector split depends on the
// address), so that it is summed as the op sums a copy of the view alone.
constexpr int64_t kSliceCopyAlignBytes = 16;

constexpr size_t kCacheLine = 64;

// Every cache line of the `bytes` bytes at `p` (none for a null `p`: a
// tensor without a storage). The gather in python.cpp keeps its own
// prefetches: this helper there measured slower (README, Design).
void prefetch_object(const void* p, size_t bytes) {
  if (p == nullptr) return;
  const char* first = static_cast<const char*>(p);
  for (size_t b = 0; b < bytes; b += kCacheLine) __builtin_prefetch(first + b);
  __builtin_prefetch(first + bytes - 1);  // the last line, where the object does not start on one
}
// Prefetches for entry i of a table's walk over [.., end) of `tensors`.
// The fields a table reads are in two objects per tensor, its TensorImpl
// (176 bytes in torch 2.13: three or four cache lines) and its
// StorageImpl (96 bytes: two or three), usually cold after the last
// call's passes over the data, and for gradients allocated between their
// parameters kilobytes from the next tensor's. Each TensorImpl is asked
// for kImplAhead entries ahead, and its StorageImpl (whose address is in
// the TensorImpl, there by then) kStorageAhead ahead, so that the misses
// overlap (README, Design: cold metadata). StorageImpls 8, 12 or 16 ahead
// with TensorImpls twice as far measured alike.
void prefetch_metadata(at::TensorList tensors, size_t i, size_t end) {
  constexpr size_t kImplAhead = 16;
  constexpr size_t kStorageAhead = 8;
  if (i + kImplAhead < end) prefetch_object(tensors[i + kImplAhead].unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
  if (i + kStorageAhead < end) {
    prefetch_object(tensors[i + kStorageAhead].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(),
                    sizeof(c10::StorageImpl));
  }
}
}  // namespace

TensorTable::TensorTable(at::TensorList tensors, Access access) {
  if (!fill_in_place(tensors, nullptr)) fill(tensors, access, access == kWrite);
}

TensorTable::TensorTable(const char* op, at::TensorList tensors, c10::DeviceType device_type, Access access,
                         bool writes, const std::function<void()>& then) {
  if (!tensors.empty() && tensors[0].defined() && tensors[0].device().type() == device_type) {
    // InferenceMode is the caller's thread's: read here, not in the walk.
    const UsualChecks checks{tensors[0].device(), writes && !c10::InferenceMode::is_enabled()};
    if (fill_in_place(tensors, &checks)) {
      then();  // the storage checks passed too: nothing else can come first
      return;
    }
  }
  check_tensors(op, tensors, device_type);
  if (writes) check_writable(op, tensors);
  then();
  fill(tensors, access, writes);
}

void TensorTable::fill(at::TensorList tensors, Access access, bool writes) {
  descs_.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    prefetch_metadata(tensors, i, tensors.size());
    const at::Tensor& t = tensors[i];
    const DType dtype = to_dtype(t.scalar_type());
    const int64_t numel = t.numel();
    const c10::StorageImpl* storage = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
    check_in_storage(t, i, storage);
    if (numel == 0 || t.is_non_overlapping_and_dense()) {
      // Reads take the const pointer: a copy-on-write tensor keeps sharing
      // its memory, as torch's reads leave it (the mutable pointer copies
      // it). A table read before any write (kRead) does so for such a
      // tensor too; the write, if any, then takes a table of its own.
      const bool shared = !writes || (access == kRead && storage != nullptr && materializes(*storage));
      void* data = numel == 0 ? nullptr : shared ? const_cast<void*>(t.const_data_ptr()) : t.data_ptr();
      shared_reads_ = shared_reads_ || (writes && shared && numel != 0);
      descs_.push_back(TensorDesc{data, numel, dtype});
      storages_.push_back(numel == 0 ? nullptr : storage->data());
      foreign_ = foreign_ || (numel != 0 && storage->allocator() == nullptr);
    } else if (access == kRead) {
      copies_.push_back(t.contiguous());
      descs_.push_back(TensorDesc{copies_.back().data_ptr(), t.numel(), dtype});
      storages_.push_back(nullptr);
    } else {
      strided_.push_back(static_cast<int64_t>(i));
      descs_.push_back(TensorDesc{nullptr, 0, dtype});
      storages_.push_back(nullptr);
    }
  }
}

bool TensorTable::fill_in_place(at::TensorList tensors, const UsualChecks* checks) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  descs_.resize(tensors.size());
  storages_.resize(tensors.size());
  std::atomic<bool> usual{true};
  std::atomic<bool> foreign{false};
  walk_tensors(n, [&](int64_t begin, int64_t end) {
    bool range_foreign = false;
    try {
      for (int64_t i = begin; i < end && usual.load(std::memory_order_relaxed); ++i) {
        prefetch_metadata(tensors, static_cast<size_t>(i), static_cast<size_t>(end));
        const at::Tensor& t = tensors[static_cast<size_t>(i)];
        if (checks != nullptr &&
            (!t.defined() || t.layout() != at::kStrided || !supported_dtype(t.scalar_type()) ||
             t.device() != checks->device || (checks->writes && t.is_inference()))) {
          usual.store(false, std::memory_order_relaxed);
          return;
        }
        const DType dtype = to_dtype(t.scalar_type());
        const int64_t numel = t.numel();
        if (numel == 0) {
          descs_[static_cast<size_t>(i)] = TensorDesc{nullptr, 0, dtype};
          storages_[static_cast<size_t>(i)] = nullptr;
          continue;
        }
        c10::StorageImpl* storage = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
        // A materializer (copy-on-write) replaces the storage's memory on
        // its first mutable access: not from two threads at once.
        if (!t.is_non_overlapping_and_dense() || storage == nullptr || materializes(*storage) ||
            !within_storage(t, storage)) {
          usual.store(false, std::memory_order_relaxed);
          return;
        }
        descs_[static_cast<size_t>(i)] = TensorDesc{t.data_ptr(), numel, dtype};
        storages_[static_cast<size_t>(i)] = storage->data();
        range_foreign = range_foreign || storage->allocator() == nullptr;
      }
    } catch (...) {  // a refused access: the one-thread walk raises it, in list order
      usual.store(false, std::memory_order_relaxed);
      return;
    }
    if (range_foreign) foreign.store(true, std::memory_order_relaxed);
  });
  if (!usual.load()) {
    descs_.clear();
    storages_.clear();
    return false;
  }
  foreign_ = foreign.load();
  return true;
}

TensorTable::TensorTable(at::TensorList tensors, int64_t slices) {
  if (slices == 1) {
    *this = TensorTable(tensors, kRead);
    return;
  }
  // Each slice as the table of the view t[s] would hold it: in place when
  // the view is dense (read in its memory order, from its own address),
  // else a row-major copy; the bits of its norm are then those of the op
  // called on the views, whatever the tensor's layout.
  descs_.reserve(tensors.size() * static_cast<size_t>(slices));
  storages_.reserve(descs_.capacity());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const DType dtype = to_dtype(t.scalar_type());
    const int64_t size = dtype_size(dtype);
    const int64_t per_slice = t.numel() / slices;
    const c10::StorageImpl* storage = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
    check_in_storage(t, i, storage);
    if (per_slice == 0) {
      for (int64_t s = 0; s < slices; ++s) {
        descs_.push_back(TensorDesc{nullptr, 0, dtype});
        storages_.push_back(nullptr);
      }
    } else if (t.select(0, 0).is_non_overlapping_and_dense()) {
      char* first = static_cast<char*>(const_cast<void*>(t.const_data_ptr()));  // read only: see fill
      for (int64_t s = 0; s < slices; ++s) {
        descs_.push_back(TensorDesc{first + s * t.stride(0) * size, per_slice, dtype});
        storages_.push_back(storage->data());
      }
      foreign_ = foreign_ || storage->allocator() == nullptr;
    } else {
      const int64_t align = kSliceCopyAlignBytes / size;
      const int64_t padded = (per_slice + align - 1) / align * align;
      at::Tensor copy = at::empty({slices, padded}, t.options().memory_format(at::MemoryFormat::Contiguous));
      copy.narrow(1, 0, per_slice).view(t.sizes()).copy_(t);
      char* first = static_cast<char*>(copy.data_ptr());
      for (int64_t s = 0; s < slices; ++s) {
        descs_.push_back(TensorDesc{first + s * padded * size, per_slice, dtype});
        storages_.push_back(nullptr);
      }
      copies_.push_back(std::move(copy));
    }
  }
}

namespace {
// A descriptor's bytes, as addresses.
struct ByteRange {
  uintptr_t begin;
  uintptr_t end;
};

ByteRange byte_range(const TensorDesc& d) {
  const auto begin = reinterpret_cast<uintptr_t>(d.data);
  return ByteRange{begin, begin + static_cast<uintptr_t>(d.numel * dtype_size(d.dtype))};
}

// Two of `ranges` share an address (sorts them by start).
bool any_meet(std::vector<ByteRange>& ranges) {
  std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) { return a.begin < b.begin; });
  uintptr_t reach = 0;  // the largest end so far
  for (size_t k = 0; k < ranges.size(); ++k) {
    if (k > 0 && ranges[k].begin < reach) return true;
    reach = std::max(reach, ranges[k].end);
  }
  return false;
}
}  // namespace

bool TensorTable::spans_overlap() const {
  // The common layouts pass in one sequential walk: every span after the
  // previous one, or every span before it (views of one buffer in order,
  // gradients allocated one after the other).
  bool up = true, down = true;
  ByteRange last{0, 0};
  size_t live = 0;  // descriptors of a tensor's own storage
  for (size_t i = 0; i < descs_.size(); ++i) {
    if (storages_[i] == nullptr) continue;
    const ByteRange r = byte_range(descs_[i]);
    if (live++ > 0) {
      up = up && last.end <= r.begin;
      down = down && r.end <= last.begin;
    }
    last = r;
  }
  if (live < 2 || up || down) return false;
  if (foreign_) {
    // Storages over memory from outside torch: two of them (torch.from_numpy
    // of two overlapping slices, found in review) or one and a tensor of
    // torch's may share bytes whatever their starts, so every range counts.
    std::vector<ByteRange> ranges;
    ranges.reserve(live);
    for (size_t i = 0; i < descs_.size(); ++i) {
      if (storages_[i] != nullptr) ranges.push_back(byte_range(descs_[i]));
    }
    return any_meet(ranges);
  }
  // Otherwise (every storage's memory from a torch allocator, which gives
  // each allocation to one storage) only tensors of one allocation can
  // share bytes: look for an allocation held twice, keyed by its start
  // (open addressing, at most half full; the table is kept per thread,
  // fresh pages for it on every call cost more than the rest).
  size_t slots = 2;
  while (slots < 2 * live) slots *= 2;
  thread_local std::vector<const void*> keys;
  keys.assign(slots, nullptr);
  constexpr uint64_t kFibonacci = 0x9E3779B97F4A7C15ull;  // multiplicative hashing
  constexpr int kHashShift = 20;
  const auto slot_of = [&](const void* key) {
    size_t h = static_cast<size_t>((reinterpret_cast<uintptr_t>(key) * kFibonacci) >> kHashShift) & (slots - 1);
    while (keys[h] != nullptr && keys[h] != key) h = (h + 1) & (slots - 1);
    return h;
  };
  bool shared = false;
  for (size_t i = 0; i < descs_.size(); ++i) {  // every storage goes in: the walk below finds each
    const void* key = storages_[i];
    if (key == nullptr) continue;
    const size_t h = slot_of(key);
    shared = shared || keys[h] == key;
    keys[h] = key;
  }
  if (!shared) return false;
  // Views of shared storages (gradient buckets, flat buffers): the same walk
  // per storage, its last range and directions kept in its slot; only a
  // storage whose ranges are in no address order needs the sort below.
  std::vector<ByteRange> last_of(slots, ByteRange{0, 0});
  std::vector<uint8_t> seen(slots, 0), rising(slots, 1), falling(slots, 1);
  bool unordered = false;
  for (size_t i = 0; i < descs_.size() && !unordered; ++i) {
    const void* key = storages_[i];
    if (key == nullptr) continue;
    const size_t h = slot_of(key);
    const ByteRange r = byte_range(descs_[i]);
    if (seen[h]) {
      rising[h] = rising[h] && last_of[h].end <= r.begin;
      falling[h] = falling[h] && r.end <= last_of[h].begin;
      unordered = !rising[h] && !falling[h];
    }
    seen[h] = 1;
    last_of[h] = r;
  }
  if (!unordered) return false;
  // Rare: compare ranges within each storage, sorted by (storage, begin):
  // a range that starts before the previous one of its storage ends overlaps it.
  std::vector<std::tuple<const void*, uintptr_t, uintptr_t>> ranges;
  ranges.reserve(live);
  for (size_t i = 0; i < descs_.size(); ++i) {
    if (storages_[i] == nullptr) continue;
    const ByteRange r = byte_range(descs_[i]);
    ranges.emplace_back(storages_[i], r.begin, r.end);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t k = 1; k < ranges.size(); ++k) {
    if (std::get<0>(ranges[k]) == std::get<0>(ranges[k - 1]) && std::get<1>(ranges[k]) < std::get<2>(ranges[k - 1])) {
      return true;
    }
  }
  return false;
}

namespace {
// A view's bytes, from its first element to one past its last (strides
// are >= 0; numel > 0).
ByteRange extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return ByteRange{begin, begin + static_cast<uintptr_t>((last + 1) * static_cast<int64_t>(t.element_size()))};
}
}  // namespace

bool TensorTable::gaps_reach_dense(at::TensorList tensors) const {
  if (strided_.empty()) return false;
  // By extents: the entries without gaps sorted by start, each view's
  // extent found among them by binary search.
  std::vector<std::pair<uintptr_t, uintptr_t>> dense;  // (begin, end) of each entry without gaps
  for (const TensorDesc& d : descs_) {
    if (d.numel == 0) continue;  // empty, or a view with gaps (no descriptor)
    const ByteRange r = byte_range(d);
    dense.emplace_back(r.begin, r.end);
  }
  std::sort(dense.begin(), dense.end());
  std::vector<uintptr_t> reach(dense.size());  // the largest end among dense[0..k]
  for (size_t k = 0; k < dense.size(); ++k) reach[k] = std::max(dense[k].second, k > 0 ? reach[k - 1] : 0);
  for (int64_t i : strided_) {
    const ByteRange view = extent(tensors[static_cast<size_t>(i)]);
    // Entries starting before the view's end; does one reach past its start?
    const auto after = std::lower_bound(dense.begin(), dense.end(), std::make_pair(view.end, uintptr_t{0}));
    const size_t n = static_cast<size_t>(after - dense.begin());
    if (n > 0 && reach[n - 1] > view.begin) return true;
  }
  return false;
}

bool TensorTable::reaches(at::TensorList tensors, const at::Tensor& x) const {
  if (x.numel() == 0) return false;
  const ByteRange target = extent(x);
  const auto meets = [&](const ByteRange& r) { return r.begin < target.end && target.begin < r.end; };
  for (const TensorDesc& d : descs_) {
    if (d.numel > 0 && meets(byte_range(d))) return true;
  }
  for (int64_t i : strided_) {
    if (meets(extent(tensors[static_cast<size_t>(i)]))) return true;
  }
  return false;
}

bool may_share_elements(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  dims.reserve(static_cast<size_t>(t.dim()));
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // the largest offset the smaller strides reach
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return true;
    reach += (size - 1) * stride;
  }
  return false;
}

bool extents_meet(at::TensorList tensors, const std::vector<int64_t>& which) {
  std::vector<ByteRange> ranges;
  ranges.reserve(which.size());
  for (int64_t i : which) {
    const at::Tensor& t = tensors[static_cast<size_t>(i)];
    if (t.numel() > 0) ranges.push_back(extent(t));
  }
  return any_meet(ranges);
}

void bump_versions(at::TensorList tensors) {
  // The counters are atomic: the same tensor twice in a list is bumped
  // twice. Inference tensors have none. A tensor without one that is not
  // an inference tensor (x.data = t of one made in InferenceMode) is
  // refused by bump() outside InferenceMode, whose flag is the calling
  // thread's: the workers leave it to this thread (found in review).
  std::atomic<int64_t> first_without{-1};
  walk_tensors(static_cast<int64_t>(tensors.size()), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      c10::TensorImpl* impl = tensors[static_cast<size_t>(i)].unsafeGetTensorImpl();
      if (impl->is_inference()) continue;
      if (impl->version_counter().enabled()) {
        impl->bump_version();
      } else {
        int64_t seen = -1;  // the first such tensor in list order
        while ((seen < 0 || i < seen) && !first_without.compare_exchange_weak(seen, i)) {
        }
      }
    }
  });
  const int64_t i = first_without.load();
  if (i >= 0) tensors[static_cast<size_t>(i)].unsafeGetTensorImpl()->bump_version();  // raises outside InferenceMode
}

void bump_clip_scalars(const at::Tensor& last_norm, const at::Tensor& last_coef, const at::Tensor& skipped,
                       bool count_skip) {
  bump_versions({last_norm, last_coef});
  if (count_skip) bump_versions({skipped});
}

}  // namespace fastclip

// The contract between Python and the kernels; one schema per op.
TORCH_LIBRARY(fastclip, m) {
  // Norm of order `ord` of all tensors seen as one vector (float32, 0-dim,
  // on their device), and, if per_tensor, the norm of each tensor (float32,
  // shape [len(tensors)]; else shape [0]). fp64: both as float64 instead,
  // not rounded to float32 (finite beyond its range), for callers that
  // combine norms further (several devices, processes, a loss scale).
  // slices > 1: every tensor's first dimension has that size, and the
  // per-tensor norms are those of its slices along it, tensor-major (shape
  // [len(tensors) * slices]); the total is still over everything. The
  // torch.vmap rules take every sample's norms from one call this way.
  m.def(
      "multi_tensor_norm(Tensor[] tensors, float ord, bool per_tensor, bool fp64=False, SymInt slices=1) -> "
      "(Tensor, Tensor)");
  // tensors *= coef in place; no memory traffic at all when coef == 1.
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
  // tensors = clamp(tensors, -clip_value, clip_value) in place; NaN stays NaN.
  m.def("multi_tensor_clamp_(Tensor(a!)[] tensors, float clip_value) -> ()");
  // Fused norm -> min(1, max_norm / (norm + 1e-6)) -> scale; returns the norm.
  // error_if_nonfinite: raise torch's error instead, before anything is
  // written, when the norm is NaN or inf (this reads the norm on the host).
  m.def("clip_(Tensor(a!)[] tensors, float max_norm, float ord, bool error_if_nonfinite=False) -> Tensor");
  // The scalars of a clipped optimizer step, in one kernel on norm's device
  // (ClippedOptimizer; see step_scalars in numerics.h). norm: the float64
  // norm of the gradients as they are, loss_scale: what they are still
  // multiplied by, extra_scale: a further divisor for a fused step;
  // found_inf, extra_found: flags set from outside (> 0). Writes
  // last_norm = norm / loss_scale and last_coef = min(1, max_norm /
  // (that + 1e-6)) (float32), adds the returned flag to skipped (int64)
  // when count_skip; returns (coef / loss_scale as float64, loss_scale *
  // extra_scale / coef as float32, found as float32 0 or 1), where found
  // is set by a flag, a non-finite norm, or with skip_inf_divisor a
  // divisor beyond float32's range. Absent scales are 1, absent flags 0.
  m.def(
      "clip_scalars_(Tensor norm, float max_norm, Tensor? loss_scale, Tensor? extra_scale, Tensor? found_inf, "
      "Tensor? extra_found, bool skip_inf_divisor, Tensor(a!) last_norm, Tensor(b!) last_coef, Tensor(c!) skipped, "
      "bool count_skip) -> (Tensor, Tensor, Tensor)");
}


namespace fastclip {
namespace {

// ------------------------------------------------------------- autograd
// The ops act on gradients and are not differentiable. Without kernels of
// their own under the Autograd key, torch runs its boxed fallback for
// custom ops on every call: the tensor list is converted to IValues and
// back and every tensor is inspected (about 0.2 ms per 10,000 tensors).
// These kernels redispatch unboxed below autograd; the in-place ones first
// refuse, as torch's in-place ops do, tensors that require grad while grad
// mode is on. Version counters are bumped by the device kernels, which know
// whether they may have written (see bump_versions in ops.h).

using fastclip::check_no_tangent;  // the list form, next to the one-tensor form below

void check_no_tangent(const char* op, const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK(!t.has_value() || first_with_tangent(*t) < 0, op, ": ", name, kTangentRefused);
}

void check_no_grad(const char* op, at::TensorList tensors) {
  if (!c10::GradMode::is_enabled()) return;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!tensors[i].requires_grad(), op, ": tensors[", i,
                "] requires grad; the op modifies it in place and is not differentiable: call it under "
                "torch.no_grad() (fastclip's Python functions do)");
  }
}

// An autograd node that raises when backward reaches it (torch's
// NotImplemented). Its pointer type differs between torch versions
// (std::shared_ptr, later c10::intrusive_ptr): the one TensorBase::grad_fn
// returns. `Impl` keeps the other version's branch uninstantiated.
using NodePtr = std::decay_t<decltype(std::declval<const at::Tensor&>().grad_fn())>;

template <typename Ptr, typename Impl = torch::autograd::NotImplemented>
Ptr not_implemented_node(const std::string& op) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<typename Ptr::element_type>>) {
    return Ptr(new Impl(op));
  } else {
    return c10::make_intrusive<Impl>(op);
  }
}

// Outputs of a non-differentiable op whose inputs require grad (grad mode
// on) get a node that raises on backward, as torch gives a custom op
// without a derivative; otherwise they would silently have no gradient
// (found in review: a loss plus the norm of the weights backpropagated as
// if the norm were a constant).
template <typename... Inputs>
void refuse_backward(const char* op, const std::vector<at::Tensor>& outputs, const Inputs&... inputs) {
  NodePtr node = not_implemented_node<NodePtr>(op);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  torch::autograd::set_history(outputs, node);
}

bool any_requires_grad(at::TensorList tensors) {
  return std::any_of(tensors.begin(), tensors.end(), [](const at::Tensor& t) { return t.requires_grad(); });
}

std::tuple<at::Tensor, at::Tensor> norm_autograd(c10::DispatchKeySet ks, at::TensorList tensors, double ord,
                                                 bool per_tensor, bool fp64, c10::SymInt slices) {
  static const auto op = op_handle<NormSymSig>("fastclip::multi_tensor_norm");
  check_no_tangent("fastclip::multi_tensor_norm", tensors);
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.redispatch(ks & c10::after_ADInplaceOrView_keyset, tensors, ord, per_tensor, fp64, std::move(slices));
  }
  if (c10::GradMode::is_enabled() && any_requires_grad(tensors)) {
    refuse_backward("fastclip::multi_tensor_norm", {std::get<0>(out), std::get<1>(out)}, tensors);
  }
  return out;
}

// A traced call (fake or functional tensors, or meta ones): no device
// kernel bumps their version counters, so the tensors seen here are bumped
// whenever the op may write, as torch's ADInplaceOrView kernels bump for
// its in-place ops. Without it AOTAutograd did not see the write, and a
// tensor saved for backward, then written in a compiled function, gave
// silently wrong gradients where eager raises (found in review).
// `ks`, the call's keys, rules a traced tensor out without a walk over
// the list (an eager call over 10,000 tensors).
bool may_be_traced(c10::DispatchKeySet ks) {
  return ks.has(c10::DispatchKey::Python) || ks.has_backend(c10::BackendComponent::MetaBit);
}
bool traced(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->is_python_dispatch() || t.device().type() == c10::DeviceType::Meta;
}
// Only the traced tensors: a real one's kernel bumps it when it writes.
void bump_if_traced(c10::DispatchKeySet ks, at::TensorList tensors) {
  if (!may_be_traced(ks)) return;
  std::vector<at::Tensor> seen;
  std::copy_if(tensors.begin(), tensors.end(), std::back_inserter(seen), traced);
  if (!seen.empty()) bump_versions(seen);
}

void scale_autograd(c10::DispatchKeySet ks, at::TensorList tensors, const at::Tensor& coef) {
  static const auto op = op_handle<ScaleSig>("fastclip::multi_tensor_scale_");
  check_no_grad("fastclip::multi_tensor_scale_", tensors);
  check_no_tangent("fastclip::multi_tensor_scale_", tensors);
  check_no_tangent("fastclip::multi_tensor_scale_", coef, "coef");
  // torch's mul_ would record coef's history in the tensors; this op would
  // drop it silently (found in review).
  TORCH_CHECK(!c10::GradMode::is_enabled() || !coef.requires_grad(),
              "fastclip::multi_tensor_scale_: coef requires grad; the op is not differentiable: call it under "
              "torch.no_grad() (fastclip's Python functions do) or pass coef.detach()");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, tensors, coef);
  }
  bump_if_traced(ks, tensors);
}

void clamp_autograd(c10::DispatchKeySet ks, at::TensorList tensors, double clip_value) {
  static const auto op = op_handle<ClampSig>("fastclip::multi_tensor_clamp_");
  check_no_grad("fastclip::multi_tensor_clamp_", tensors);
  check_no_tangent("fastclip::multi_tensor_clamp_", tensors);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, tensors, clip_value);
  }
  bump_if_traced(ks, tensors);
}

at::Tensor clip_autograd(c10::DispatchKeySet ks, at::TensorList tensors, double max_norm, double ord,
                         bool error_if_nonfinite) {
  static const auto op = op_handle<ClipSig>("fastclip::clip_");
  check_no_grad("fastclip::clip_", tensors);
  check_no_tangent("fastclip::clip_", tensors);
  at::Tensor norm;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    norm = op.redispatch(ks & c10::after_ADInplaceOrView_keyset, tensors, max_norm, ord, error_if_nonfinite);
  }
  bump_if_traced(ks, tensors);
  return norm;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_scalars_autograd(
    c10::DispatchKeySet ks, const at::Tensor& norm, double max_norm, const std::optional<at::Tensor>& loss_scale,
    const std::optional<at::Tensor>& extra_scale, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& extra_found, bool skip_inf_divisor, const at::Tensor& last_norm,
    const at::Tensor& last_coef, const at::Tensor& skipped, bool count_skip) {
  static const auto op = op_handle<ClipScalarsSig>("fastclip::clip_scalars_");
  check_no_tangent("fastclip::clip_scalars_", norm, "norm");
  check_no_tangent("fastclip::clip_scalars_", loss_scale, "loss_scale");
  check_no_tangent("fastclip::clip_scalars_", extra_scale, "extra_scale");
  if (c10::GradMode::is_enabled()) {
    const std::pair<const char*, const at::Tensor*> written[] = {{"last_norm", &last_norm}, {"last_coef", &last_coef}};
    for (const auto& [name, t] : written) {
      TORCH_CHECK(!t->requires_grad(), "fastclip::clip_scalars_: ", name,
                  " requires grad; the op writes it in place and is not differentiable");
    }
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.redispatch(ks & c10::after_ADInplaceOrView_keyset, norm, max_norm, loss_scale, extra_scale, found_inf,
                        extra_found, skip_inf_divisor, last_norm, last_coef, skipped, count_skip);
  }
  if (may_be_traced(ks) && traced(last_norm)) bump_clip_scalars(last_norm, last_coef, skipped, count_skip);
  const auto requires_grad = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  if (c10::GradMode::is_enabled() && (norm.requires_grad() || requires_grad(loss_scale) || requires_grad(extra_scale))) {
    // The factor and divisor come from them; the found flag is not differentiable.
    refuse_backward("fastclip::clip_scalars_", {std::get<0>(out), std::get<1>(out)}, norm, loss_scale, extra_scale);
  }
  return out;
}

// -------------------------------------------------------- negative bit
// A view with the negative bit (`x.conj().imag`, `torch._neg_view`): torch's
// Negative fallback refuses a list written in place that holds one. Each
// written op gives the same memory whatever the sign of its data (a scale;
// a clamp to [-c, c]; a clip, whose norm is of |x|), so it runs on the
// views without the bit, over the same bytes. Eager calls route such
// views to plain PyTorch first (fastclip/clip.py); under torch.compile,
// which cannot ask is_neg(), they reach the ops (found in review).
// The view shares the original's version counter: made below
// ADInplaceOrView (inside the Autograd kernel's guard) it would get one of
// its own, and the write would leave the original and its base at their
// versions, so that autograd used the overwritten values silently (found
// in review: a gradient came out 3x too large where torch raises).
std::vector<at::Tensor> without_neg_bit(at::TensorList tensors) {
  std::vector<at::Tensor> out(tensors.begin(), tensors.end());
  for (at::Tensor& t : out) {
    if (!t.is_neg()) continue;
    at::Tensor view = at::_neg_view(t);  // flips the bit back: the same bytes, read as stored
    if (!t.is_inference()) view.unsafeGetTensorImpl()->set_version_counter(t.unsafeGetTensorImpl()->version_counter());
    t = std::move(view);
  }
  return out;
}

const c10::DispatchKeySet kAfterNegative(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::Negative);

void scale_negative(c10::DispatchKeySet ks, at::TensorList tensors, const at::Tensor& coef) {
  static const auto op = op_handle<ScaleSig>("fastclip::multi_tensor_scale_");
  // Resolving reads coef: its memory is checked first (as check_coef would).
  // (Shape and layout first: found in review, a many-element coef was
  // resolved, reading freed memory, before check_coef refused its size.)
  if (coef.is_neg()) {
    TORCH_CHECK(coef.numel() == 1 && coef.layout() == at::kStrided,
                "fastclip::multi_tensor_scale_: coef must be a dense tensor with one element, got ", coef.sizes());
    check_scalar_memory("fastclip::multi_tensor_scale_", "coef", coef);
  }
  op.redispatch(ks & kAfterNegative, without_neg_bit(tensors), coef.is_neg() ? coef.resolve_neg() : coef);
}

void clamp_negative(c10::DispatchKeySet ks, at::TensorList tensors, double clip_value) {
  static const auto op = op_handle<ClampSig>("fastclip::multi_tensor_clamp_");
  op.redispatch(ks & kAfterNegative, without_neg_bit(tensors), clip_value);
}

at::Tensor clip_negative(c10::DispatchKeySet ks, at::TensorList tensors, double max_norm, double ord,
                         bool error_if_nonfinite) {
  static const auto op = op_handle<ClipSig>("fastclip::clip_");
  return op.redispatch(ks & kAfterNegative, without_neg_bit(tensors), max_norm, ord, error_if_nonfinite);
}

// A norm is of |x|: the views without the bit, whose memory the kernels'
// checks then see (torch's fallback copied what lay beyond a shrunk
// storage before any check; found in review).
std::tuple<at::Tensor, at::Tensor> norm_negative(c10::DispatchKeySet ks, at::TensorList tensors, double ord,
                                                 bool per_tensor, bool fp64, c10::SymInt slices) {
  static const auto op = op_handle<NormSymSig>("fastclip::multi_tensor_norm");
  return op.redispatch(ks & kAfterNegative, without_neg_bit(tensors), ord, per_tensor, fp64, std::move(slices));
}

// The written logs must not carry the bit: torch's fallback would write
// the others, then fail an internal assert (found in review; in inference
// mode no Autograd kernel runs before this one). The scalars read are
// resolved as the fallback would, after the memory check the fallback's
// copy would skip (found in review: a shrunk `norm` segfaulted).
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_scalars_negative(
    c10::DispatchKeySet ks, const at::Tensor& norm, double max_norm, const std::optional<at::Tensor>& loss_scale,
    const std::optional<at::Tensor>& extra_scale, const std::optional<at::Tensor>& found_inf,
    const std::optional<at::Tensor>& extra_found, bool skip_inf_divisor, const at::Tensor& last_norm,
    const at::Tensor& last_coef, const at::Tensor& skipped, bool count_skip) {
  static const auto op = op_handle<ClipScalarsSig>("fastclip::clip_scalars_");
  constexpr const char* kOp = "fastclip::clip_scalars_";
  const std::pair<const char*, const at::Tensor*> outputs[] = {
      {"last_norm", &last_norm}, {"last_coef", &last_coef}, {"skipped", &skipped}};
  for (const auto& [name, t] : outputs) {
    TORCH_CHECK(!t->defined() || !t->is_neg(), kOp, ": ", name,
                " is a negative-bit view (torch._neg_view); resolve_neg() it first");
  }
  const auto resolved = [&](const char* name, const at::Tensor& t) {
    if (!t.defined() || !t.is_neg()) return t;
    TORCH_CHECK(t.numel() == 1 && t.layout() == at::kStrided, kOp, ": ", name,
                " must be a dense tensor with one element, got ", t.sizes());
    check_scalar_memory(kOp, name, t);
    return t.resolve_neg();
  };
  const auto resolved_opt = [&](const char* name, const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value()) return t;
    return resolved(name, *t);
  };
  return op.redispatch(ks & kAfterNegative, resolved("norm", norm), max_norm, resolved_opt("loss_scale", loss_scale),
                       resolved_opt("extra_scale", extra_scale), resolved_opt("found_inf", found_inf),
                       resolved_opt("extra_found", extra_found), skip_inf_divisor, last_norm, last_coef, skipped,
                       count_skip);
}

}  // namespace
}  // namespace fastclip

// Every op under the Negative key (see without_neg_bit): torch's fallback
// copies what it resolves before the ops' checks can see it.
TORCH_LIBRARY_IMPL(fastclip, Negative, m) {
  m.impl("multi_tensor_norm", &fastclip::norm_negative);
  m.impl("multi_tensor_scale_", &fastclip::scale_negative);
  m.impl("multi_tensor_clamp_", &fastclip::clamp_negative);
  m.impl("clip_", &fastclip::clip_negative);
  m.impl("clip_scalars_", &fastclip::clip_scalars_negative);
}

// One registration for every device's autograd key.
TORCH_LIBRARY_IMPL(fastclip, Autograd, m) {
  m.impl("multi_tensor_norm", &fastclip::norm_autograd);
  m.impl("multi_tensor_scale_", &fastclip::scale_autograd);
  m.impl("multi_tensor_clamp_", &fastclip::clamp_autograd);
  m.impl("clip_", &fastclip::clip_autograd);
  m.impl("clip_scalars_", &fastclip::clip_scalars_autograd);
}
