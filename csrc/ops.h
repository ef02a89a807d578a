// fastclip: torch glue shared by every device implementation: argument
// checks and the conversion of a tensor list into a descriptor table.
// Kernels never see this header; they take the TensorDesc table only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fastclip.h"

namespace fastclip {

// Checks shared by all ops, done before anything is written so that a
// failing call modifies nothing. `op` names the op in messages.
//   - every tensor is strided (dense layout), of a supported dtype, and on
//     the same device as tensors[0];
//   - the device type is `device_type` (the key this implementation serves).
void check_tensors(const char* op, at::TensorList tensors, c10::DeviceType device_type);
// For the in-place ops, before anything is written: no tensor may have
// elements that share memory (an expand()ed view), which a kernel would
// write twice, and no tensor may be an inference tensor outside
// InferenceMode. ATen refuses both too, but refuses the second only after
// it has written.
void check_writable(const char* op, at::TensorList tensors);
// What check_writable and TensorTable would refuse in `t` (any layout; only
// dense tensors are checked), or nullptr: "inference", "overlap" (elements
// that share memory) or "storage" (elements beyond its storage's memory).
// The Python API's split path asks it of every tensor before writing any.
const char* unwritable_reason(const at::Tensor& t);
void check_norm_order(const char* op, double ord);
// The checks a list op makes before it reads any data (python.cpp), for
// the fake kernels and the batching rules; `op` without "fastclip::".
void check_list_op(const std::string& op, const std::vector<at::Tensor>& tensors, std::optional<double> ord,
                   std::optional<double> max_norm, std::optional<double> clip_value,
                   const std::optional<at::Tensor>& coef, int64_t slices);
// multi_tensor_norm's slices: at least 1, and when above 1 the size of
// every tensor's first dimension.
void check_slices(const char* op, at::TensorList tensors, int64_t slices);
void check_max_norm(const char* op, double max_norm);
void check_clip_value(const char* op, double clip_value);
// torch's error_if_nonfinite error when `norm` is NaN or inf.
void check_norm_finite(double norm, double ord);
// The same error, unconditionally (for a non-finite flag computed on a device).
[[noreturn]] void raise_nonfinite_norm(double ord);
// coef: a one-element dense floating tensor on the CPU or on `device`,
// whose element lies in its storage.
void check_coef(const char* op, const at::Tensor& coef, const c10::Device& device);
// The arguments of clip_scalars_, before anything is written: norm a
// one-element floating tensor of a `device_type` device; the optional
// scalars one-element floating tensors and the logs one-element float32
// (last_norm, last_coef) and int64 (skipped) tensors, all on norm's device.
void check_clip_scalars(const char* op, const at::Tensor& norm, double max_norm,
                        const std::optional<at::Tensor>& loss_scale, const std::optional<at::Tensor>& extra_scale,
                        const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& extra_found,
                        const at::Tensor& last_norm, const at::Tensor& last_coef, const at::Tensor& skipped,
                        c10::DeviceType device_type);

// No ATen worker threads for this call: one thread, inside a parallel
// region already, or in a child made by fork(), whose OpenMP workers did
// not survive it (a parallel region there waits for them forever).
bool host_runs_serially();

// Marks the tensors as modified for autograd, as torch's in-place ops do,
// so that a saved tensor a clip wrote is caught at backward time. Called by
// the device kernels after any launch or loop that may have written: the
// CPU knows whether it wrote (a coefficient of 1 writes nothing), a GPU
// decides on the device, so its glue bumps whenever a writing kernel ran.
void bump_versions(at::TensorList tensors);
// The version bumps of clip_scalars_: its logs, and skipped when counted.
void bump_clip_scalars(const at::Tensor& last_norm, const at::Tensor& last_coef, const at::Tensor& skipped,
                       bool count_skip);

// Forward-mode AD (torch.autograd.forward_ad), whose tangents the kernels
// do not propagate. dual_level_active: one lock, false outside every
// forward_ad.dual_level, where no tensor has a tangent (callers ask it once
// per list, not per tensor). has_tangent: at any active level.
// first_with_tangent: the index of the first such tensor, or -1.
bool dual_level_active();
bool has_tangent(const at::Tensor& t);
int64_t first_with_tangent(at::TensorList tensors);
// The ops' refusal of a tangent: "op: tensors[i] carries ...".
void check_no_tangent(const char* op, at::TensorList tensors);

bool supported_dtype(at::ScalarType t);
DType to_dtype(at::ScalarType t);

// The tensors of one call as flat spans. A tensor that is non-overlapping
// and dense is used in place. Any other view (a slice with gaps) is copied
// to a contiguous buffer for reading; for writing, `strided` lists it and
// its write descriptor is empty (the device code writes it through a
// contiguous copy or its strides). Every tensor's elements must lie in its
// storage's memory (checked: a storage can be resized under a tensor).
class TensorTable {
 public:
  enum Access { kRead, kWrite };
  TensorTable(at::TensorList tensors, Access access);
  // check_tensors(op, tensors, device_type), check_writable(op, tensors)
  // when `writes`, `then()` (the op's other argument checks), then the
  // table: the checks and the table in one walk of the list where every
  // tensor passes the checks and is dense or empty (the common case), else
  // one after the other, which raise their errors in list order. Either
  // way the errors come in that order (the storage check is the table's).
  TensorTable(const char* op, at::TensorList tensors, c10::DeviceType device_type, Access access, bool writes,
              const std::function<void()>& then);
  // For reading: every tensor as `slices` descriptors, one per slice along
  // its first dimension (check_slices first), tensor-major. A tensor whose
  // slices are consecutive dense blocks of its memory is sliced in place,
  // any other is read through one contiguous copy: no view per slice.
  TensorTable(at::TensorList tensors, int64_t slices);

  const std::vector<TensorDesc>& descs() const { return descs_; }
  const std::vector<int64_t>& strided() const { return strided_; }
  // Every descriptor is the tensor's own memory (no read copy, no view
  // left to ATen, no copy-on-write memory still shared): the table serves
  // reads and writes alike.
  bool in_place() const { return copies_.empty() && strided_.empty() && !shared_reads_; }
  // Two descriptors share bytes: the same tensor twice in the list, or
  // overlapping views of one storage. Their writes must then run in list
  // order, as torch's loop over the tensors does, not at the same time.
  bool spans_overlap() const;
  // A view with gaps (written through `strided`, after the other entries)
  // whose bytes, first element to last, reach those of an entry without
  // gaps: the list must then be written one entry at a time in list order
  // (found in review: a bf16 view with gaps of a float32 gradient was
  // scaled after the gradient; only two dtypes over the same bytes can
  // tell). `tensors`: those the table was made of.
  bool gaps_reach_dense(at::TensorList tensors) const;
  // An entry's bytes (first element to last for a view with gaps) meet
  // those of `x`, by address: x is written while it is read otherwise.
  bool reaches(at::TensorList tensors, const at::Tensor& x) const;

 private:
  // What the walk of the common case checks besides each tensor's layout
  // and storage: what check_tensors and check_writable would refuse.
  struct UsualChecks {
    c10::Device device;   // every tensor's (tensors[0]'s, of the op's device type)
    bool writes;          // refuse an inference tensor (outside InferenceMode)
  };
  // The common case, on ATen's threads for a long list: every tensor dense
  // (or empty) and within its storage, and passing `checks` when given.
  // False (and the table left empty) for any other list, which the
  // one-thread walk then builds, raising its errors in list order.
  bool fill_in_place(at::TensorList tensors, const UsualChecks* checks);
  // The one-thread walk; `writes`: an op will write through the table.
  void fill(at::TensorList tensors, Access access, bool writes);

  std::vector<TensorDesc> descs_;
  std::vector<const void*> storages_;  // each descriptor's allocation, its storage's start (nullptr: empty or a copy)
  // A descriptor's storage holds memory no torch allocator gave it
  // (torch.from_numpy, from_blob, DLPack): it may share bytes with any
  // other storage, so spans_overlap compares every range.
  bool foreign_ = false;
  std::vector<int64_t> strided_;
  std::vector<at::Tensor> copies_;  // keeps contiguous read copies alive
  // A table for reading then writing (kRead, `writes`) holds copy-on-write
  // memory another tensor shares: not to be written through.
  bool shared_reads_ = false;
};

// Whether two elements of the view `t` may lie at one address (an
// as_strided view whose rows overlap, which torch's overlap check calls
// "too hard" and lets through): false when its strides, in increasing
// order, each pass the reach of the smaller ones.
bool may_share_elements(const at::Tensor& t);

// Whether the extents (first element to last) of two of the views `which`
// of `tensors` meet, by address, whatever their storages: such views may
// share bytes and are written one at a time, in list order.
bool extents_meet(at::TensorList tensors, const std::vector<int64_t>& which);

// The op `name` ("fastclip::clip_"), for calls through the dispatcher from C++.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The ops' C++ signatures (the schemas are in ops.cpp).
using NormSig = std::tuple<at::Tensor, at::Tensor>(at::TensorList, double, bool, bool, int64_t);
// The same call with `slices` symbolic, as the kernels above the device
// ones (Autograd, Negative) take it: an int64_t there made a traced
// batch size a constant.
using NormSymSig = std::tuple<at::Tensor, at::Tensor>(at::TensorList, double, bool, bool, c10::SymInt);
using ScaleSig = void(at::TensorList, const at::Tensor&);
using ClampSig = void(at::TensorList, double);
using ClipSig = at::Tensor(at::TensorList, double, double, bool);
using ClipScalarsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool);

namespace cpu {
// How the CPU kernels' software prefetcher covers each run of adjacent
// chunks (multi_tensor_cpu.cpp): all of it, or its head; the head in bytes
// the driver gives every stream; and what decided it (the
// FASTCLIP_CPU_PREFETCH variable or the CPU's model). Decided once per
// process; a value of the variable other than all or heads is ignored
// with a warning.
struct PrefetchChoice {
  bool whole_segments;
  int64_t head_bytes;
  std::string decided_by;
};
PrefetchChoice prefetch_choice();
}  // namespace cpu

}  // namespace fastclip
