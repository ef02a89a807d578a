// fastclip: the pybind11 module fastclip._C. Loading it registers the ops
// (ops.cpp and the device files); this file adds what the Python API needs
// to reach them cheaply with thousands of tensors:
//   - HeldTensors: the gradients of a parameter list (or a tensor list),
//     gathered in one C++ pass and kept as C++ tensors, with methods that
//     call the fused ops through the dispatcher;
//   - single_call_blocker: why a Python list cannot go to one op call;
//   - dense_and_apart: whether a fused optimizer step may write the tensors.
#include <ATen/functorch/BatchedTensorImpl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#include "ops.h"

#ifndef FASTCLIP_VERSION
#define FASTCLIP_VERSION "unknown"
#endif

namespace fastclip {
// The Python batching rule of `op` ("multi_tensor_norm", "clip_") for the
// cases the C++ one leaves (batching.cpp); set when fastclip._ops loads.
void set_vmap_rule(const std::string& op, pybind11::object rule);

namespace {

// A tangent on `t` or, under torch.vmap, on the value it batches: in
// jvp(vmap(f)) the gradients are batched duals, and the ops' batching rules
// would hand the duals to the ops, which refuse them; plain PyTorch batches
// and propagates them as in vmap(jvp(f)).
bool has_tangent_within(const at::Tensor& t) {
  const at::Tensor* inner = &t;
  while (const at::functorch::BatchedTensorImpl* batched = at::functorch::maybeGetBatchedImpl(*inner)) {
    inner = &batched->value();
  }
  return has_tangent(*inner);
}

// Why `t` cannot join `first` in one op call, or nullptr. `dual`: a
// forward-AD level is active (dual_level_active(), asked once per list).
const char* blocker(const at::Tensor& t, const at::Tensor& first, bool dual) {
  if (t.layout() != at::kStrided) return "sparse";
  if (dual && has_tangent_within(t)) return "forward AD";
  if (t.is_complex()) return "complex";
  // torch's Negative fallback refuses in-place ops on a list holding a
  // negative-bit view (torch._neg_view); the plain-PyTorch path scales it
  // one tensor at a time, as torch's foreach=False loop does.
  if (t.is_neg()) return "negative view";
  if (!supported_dtype(t.scalar_type())) return "dtype";
  if (t.device() != first.device()) return "devices";
  // DTensor and other __torch_dispatch__ subclasses: the ops would reach the
  // subclass's dispatch, which knows nothing of them; Python unwraps them first.
  if (t.key_set().has(c10::DispatchKey::Python)) return "subclass";
  // torch.func.functionalize's wrappers: its C++ functionalization cannot
  // run a custom op that writes a list in place (found in review).
  if (t.key_set().has(c10::DispatchKey::Functionalize)) return "functional tensor";
  // torch.vmap's batched tensors go to the ops, whose batching rules
  // (fastclip/_ops.py) take them; nested tensors' batching has none.
  if (t.key_set().has(c10::DispatchKey::BatchedNestedTensor)) return "batched nested tensor";
  return nullptr;
}

// Why a list cannot go to the ops as one call, or None when it can: the
// Python fast path asks this once per call instead of inspecting tensors
// one by one in Python (which costs ~0.1 us per attribute per tensor).
std::optional<std::string> single_call_blocker(const std::vector<at::Tensor>& tensors) {
  const bool dual = dual_level_active();
  for (const at::Tensor& t : tensors) {
    if (const char* why = blocker(t, tensors[0], dual)) return std::string(why);
  }
  return std::nullopt;
}

// (index, why) of the first tensor an in-place op would refuse (see
// unwritable_reason), or none.
std::optional<std::tuple<int64_t, std::string>> first_unwritable(const std::vector<at::Tensor>& tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (const char* why = unwritable_reason(tensors[i])) return std::make_tuple(static_cast<int64_t>(i), std::string(why));
  }
  return std::nullopt;
}

// Every tensor one dense block (strided, neither gaps nor overlap) and no
// two sharing bytes: torch's fused optimizer kernels read and write each
// gradient as one dense block, once per parameter, so only such gradients
// may carry a folded clip (found in review: a fused step with grad_scale
// wrote the gaps of a gradient that was a strided view, and divided a
// gradient shared by two parameters twice).
// Whether two of these dense tensors (one block of bytes each) share a
// byte: their blocks sorted by address. Of any dtype (found in review: the
// ops' table refused float8 here, where a fused step sees such a list).
bool dense_blocks_overlap(const std::vector<at::Tensor>& tensors) {
  std::vector<std::pair<uintptr_t, uintptr_t>> blocks;
  blocks.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    if (impl->numel() == 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(impl->data());
    blocks.emplace_back(begin, begin + static_cast<uintptr_t>(impl->numel() * static_cast<int64_t>(impl->itemsize())));
  }
  std::sort(blocks.begin(), blocks.end());
  for (size_t i = 1; i < blocks.size(); ++i) {
    if (blocks[i].first < blocks[i - 1].second) return true;
  }
  return false;
}

bool dense_and_apart(const std::vector<at::Tensor>& tensors) {
  const auto dense = [](const at::Tensor& t) {
    return t.layout() == c10::kStrided && t.is_non_overlapping_and_dense();
  };
  if (!std::all_of(tensors.begin(), tensors.end(), dense)) return false;
  const auto memoryless = [](const at::Tensor& t) {  // meta, fake: nothing to share
    return t.is_meta() || t.key_set().has(c10::DispatchKey::Python);
  };
  if (std::any_of(tensors.begin(), tensors.end(), memoryless)) return true;
  // Gradients allocated one after the other lie in address order: one walk
  // (the ops' full check, a table of the list, cost 0.33 ms per 10,000).
  bool up = true, down = true;
  uintptr_t last_begin = 0, last_end = 0;
  bool first = true;
  constexpr size_t kStorageAhead = 8;  // StorageImpls are separate, cold objects: their misses overlap
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (i + kStorageAhead < tensors.size()) {
      __builtin_prefetch(tensors[i + kStorageAhead].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
    }
    const c10::TensorImpl* impl = tensors[i].unsafeGetTensorImpl();
    if (impl->numel() == 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(impl->data());
    const uintptr_t end = begin + static_cast<uintptr_t>(impl->numel() * static_cast<int64_t>(impl->itemsize()));
    if (!first) {
      up = up && last_end <= begin;
      down = down && end <= last_begin;
      if (!up && !down) return !dense_blocks_overlap(tensors);
    }
    first = false;
    last_begin = begin;
    last_end = end;
  }
  return true;
}

// True when the ops have kernels for tensors of this device type.
bool has_kernels(c10::DeviceType type) {
  static const bool cuda = [] {
    const auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName("fastclip::clip_", ""));
    return op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  }();
  return type == c10::DeviceType::CPU || (type == c10::DeviceType::CUDA && cuda);
}

// True when `.grad` of objects of this Python type can be read in C++:
// torch.Tensor, nn.Parameter, and subclasses (the DTensor parameters of
// FSDP2) that override neither .grad, nor __getattribute__, nor
// __torch_function__, any of which could change what .grad gives. Asking
// Python instead costs ~1 us per parameter. In a list of tensors, the
// others go to the ops through torch.ops, which calls their
// __torch_function__. The type's own entries are compared, as its MRO
// holds them (not read through the class: a descriptor may refuse that,
// found in review).
// Decided once per type and version of it: assigning an attribute to a
// class (or a base) changes its version tag (found in review: a `grad`
// property added after the first call was not read, and the gradient was
// not clipped). From Python 3.11 on tags are never reused, so an entry of a
// type since freed cannot match another type at its address, and no
// reference is kept (found in review: one per type kept every class, and
// all its class body held, alive for the life of the process). Python 3.10
// starts its tags again at 1 after sys._clear_type_cache() (found in
// review: a changed class got its old tag back, and its old verdict):
// there each call decides afresh.
bool reads_grad_in_cpp(PyTypeObject* type) {
  struct Verdict {
    unsigned int version;  // the type's tp_version_tag when decided; 0: none, decide again
    bool plain;
  };
  constexpr bool kTagsUnique = PY_VERSION_HEX >= 0x030B0000;
  // Entries of freed types are only dropped with the rest, at this size.
  constexpr size_t kMaxKnownTypes = 4096;
  static std::unordered_map<PyTypeObject*, Verdict> known;  // guarded by the GIL
  const auto found = kTagsUnique ? known.find(type) : known.end();
  if (found != known.end() && found->second.version != 0 && found->second.version == type->tp_version_tag) {
    return found->second.plain;
  }
  // Interned once, kept for the life of the process (no decref after Python has finalized).
  static PyObject* const grad_name = PyUnicode_InternFromString("grad");
  static PyObject* const getattribute_name = PyUnicode_InternFromString("__getattribute__");
  static PyObject* const torch_function_name = PyUnicode_InternFromString("__torch_function__");
  if (grad_name == nullptr || getattribute_name == nullptr || torch_function_name == nullptr) {
    throw pybind11::error_already_set();
  }
  // The entry the MRO holds: borrowed, or nullptr; no descriptor is called.
  const auto entry = [](PyTypeObject* t, PyObject* name) { return _PyType_Lookup(t, name); };
  auto* const tensor = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  static PyObject* const base_grad = Py_XNewRef(entry(tensor, grad_name));
  static PyObject* const base_getattribute = Py_XNewRef(entry(tensor, getattribute_name));
  static PyObject* const disabled =
      pybind11::object(pybind11::module_::import("torch._C").attr("_disabled_torch_function_impl")).release().ptr();
  const bool plain = type == tensor ||
                     (entry(type, grad_name) == base_grad && entry(type, getattribute_name) == base_getattribute &&
                      entry(type, torch_function_name) == disabled);
  if (!kTagsUnique) return plain;
  // The lookups above gave the type a version tag where it can have one.
  const Verdict verdict{type->tp_version_tag, plain};
  if (found != known.end()) {
    found->second = verdict;
  } else {
    if (known.size() >= kMaxKnownTypes) known.clear();
    known.emplace(type, verdict);
  }
  return plain;
}

// Reading an item's gradient follows a chain of pointers: the Python
// object, its TensorImpl, the autograd meta, the gradient's TensorImpl.
// After a training step has streamed its data through the caches every
// link is a miss, taken one after the other for each item. Prefetching
// link k of the item kChainAhead * (kChainLinks - k) places ahead turns
// them into misses that overlap (10,000 gradients between their
// parameters, caches flushed before each call: 2.0 -> 1.5 ms to gather
// them from the parameters, 1.0 -> 0.6 ms from a list of the gradients).
constexpr size_t kChainAhead = 8;
constexpr size_t kChainLinks = 4;
// Lines prefetched of a TensorImpl: its sizes, dtype, device and storage
// fields span its first few cache lines.
constexpr int kImplLines = 4;
constexpr int kCacheLine = 64;

void prefetch_lines(const void* p, int lines) {
  for (int l = 0; l < lines; ++l) __builtin_prefetch(static_cast<const char*>(p) + l * kCacheLine);
}

// Prefetches link `link` of items[j]: 0 is the Python object, 1 its
// TensorImpl, 2 the autograd meta, 3 the gradient (a list of tensors has
// links 0 and 1 only). Each link's pointer was prefetched earlier. Every
// link starts again from the list, which keeps the object alive: pointers
// kept from an earlier step could be stale if a .grad getter (Python) has
// changed the list meanwhile. Only items of `type` (already checked to be
// a tensor type whose .grad is read in C++) are followed past the object.
void prefetch_link(PyObject* items, size_t j, size_t link, PyTypeObject* type, bool grads) {
  if (j >= static_cast<size_t>(PyList_GET_SIZE(items))) return;
  PyObject* obj = PyList_GET_ITEM(items, static_cast<Py_ssize_t>(j));
  if (link == 0) return __builtin_prefetch(obj);
  if (type == nullptr || Py_TYPE(obj) != type || (link > 1 && !grads)) return;  // tensors: one link less
  c10::TensorImpl* impl = THPVariable_Unpack(obj).unsafeGetTensorImpl();
  if (link == 1) return prefetch_lines(impl, kImplLines);
  c10::AutogradMetaInterface* meta = impl->autograd_meta();
  if (meta == nullptr) return;
  if (link == 2) return __builtin_prefetch(meta);
  prefetch_lines(static_cast<torch::autograd::AutogradMeta*>(meta)->grad_.unsafeGetTensorImpl(), kImplLines);
}

// t.grad() without its leaf check where the gradient is defined: the check
// only warns about an undefined one, and costs a few virtual calls per
// parameter (with the list's size read inline and the last type
// remembered: 10,000 parameters gathered in 470-480 -> 350-410 us).
const at::Tensor& grad_of(const at::Tensor& t) {
  if (c10::AutogradMetaInterface* meta = t.unsafeGetTensorImpl()->autograd_meta()) {
    const at::Tensor& grad = static_cast<torch::autograd::AutogradMeta*>(meta)->grad_;
    if (grad.defined()) return grad;
  }
  return t.grad();  // undefined: torch's warning for a tensor that is not a leaf
}

// Tensors gathered from a Python list in one C++ pass and kept as C++
// tensors: the gradients that are not None of a list of parameters, or the
// elements of a list of tensors. A call through torch.ops would need a
// Python list of the gradients (a Python object per gradient, created for
// gradients autograd has just allocated), its conversion to IValues and
// back; here the list is the C++ vector, passed to the op as a TensorList.
// The GIL is released while an op runs, as torch.ops does.
class HeldTensors {
 public:
  // `grads`: take each element's .grad; `name` names the list in errors.
  HeldTensors(const pybind11::list& items, bool grads, const std::string& name) : grads_(grads), name_(name) {
    tensors_.reserve(items.size());
    positions_.reserve(items.size());
    PyTypeObject* plain = nullptr;  // the last item type read in C++ (lists hold one type)
    // Its version tag then: a .grad in Python may change a class mid-call. A
    // type without a tag (0: Python 3.13 gives none to a class changed 1,000
    // times) keeps its verdict for the call (found in review: deciding it
    // again per item tripled the gather's time).
    unsigned int plain_version = 0;
    const auto read_in_cpp = [&](PyTypeObject* type) {
      if (type == plain && (plain_version == 0 || type->tp_version_tag == plain_version)) return true;
      if (!reads_grad_in_cpp(type)) return false;
      plain = type;
      plain_version = type->tp_version_tag;
      return true;
    };
    const bool dual = dual_level_active();
    // The size read again per item (a .grad in Python could change the list), inline.
    for (size_t i = 0; i < static_cast<size_t>(PyList_GET_SIZE(items.ptr())); ++i) {
      for (size_t link = 0; link < kChainLinks; ++link) {
        prefetch_link(items.ptr(), i + kChainAhead * (kChainLinks - link), link, plain, grads);
      }
      // Held for the iteration: a .grad or __class__ in Python could change the list.
      const pybind11::object item = items[i];
      PyObject* obj = item.ptr();
      if (!THPVariable_Check(obj)) {
        throw pybind11::type_error(name + "[" + std::to_string(i) + "] is a " + Py_TYPE(obj)->tp_name +
                                   ", not a torch.Tensor");
      }
      at::Tensor t;
      if (!grads) {
        t = THPVariable_Unpack(obj);
        if (!read_in_cpp(Py_TYPE(obj)) && !why_) {
          // Its __torch_function__ must see the ops: torch.ops calls it (found
          // in review: an UninitializedParameter's norm was taken as 0).
          why_ = "torch_function subclass";
        }
      } else if (read_in_cpp(Py_TYPE(obj))) {  // the last type's verdict: no lookup per item
        t = grad_of(THPVariable_Unpack(obj));
      } else {
        // This subclass may override .grad: ask Python.
        pybind11::object g = pybind11::reinterpret_borrow<pybind11::object>(obj).attr("grad");
        if (!g.is_none() && !THPVariable_Check(g.ptr())) {
          throw pybind11::type_error(name + "[" + std::to_string(i) + "].grad is not a tensor");
        }
        if (!g.is_none()) t = THPVariable_Unpack(g.ptr());
      }
      if (!t.defined()) continue;
      if (!why_) {
        if (const char* b = blocker(t, tensors_.empty() ? t : tensors_.front(), dual)) why_ = b;
      }
      tensors_.push_back(std::move(t));
      positions_.push_back(static_cast<int64_t>(i));
    }
    if (!why_ && !tensors_.empty() && !has_kernels(tensors_.front().device().type())) why_ = "no kernels";
  }

  int64_t size() const { return static_cast<int64_t>(tensors_.size()); }
  bool dense_and_apart() const { return fastclip::dense_and_apart(tensors_); }
  std::optional<std::tuple<int64_t, std::string>> first_unwritable() const {
    return fastclip::first_unwritable(tensors_);
  }
  // The device of the first tensor (the CPU for an empty list).
  c10::Device device() const { return tensors_.empty() ? c10::Device(c10::kCPU) : tensors_.front().device(); }
  const std::optional<std::string>& blocker_reason() const { return why_; }
  // The whole list can go to one op call.
  bool one_call() const { return !tensors_.empty() && !why_; }

  // Each tensor's index in the caller's list (None gradients are skipped),
  // as an int64 CPU tensor: a Python list of them cost more to convert
  // than the gather (10,000 items: 0.45 ms).
  at::Tensor positions() const {
    at::Tensor out = at::empty({static_cast<int64_t>(positions_.size())}, at::TensorOptions().dtype(at::kLong));
    std::copy(positions_.begin(), positions_.end(), out.data_ptr<int64_t>());
    return out;
  }

  pybind11::list tensors() const {
    pybind11::list out;
    for (const at::Tensor& t : tensors_) {
      out.append(pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(t)));
    }
    return out;
  }

  std::tuple<at::Tensor, at::Tensor> norm(double ord, bool per_tensor, bool fp64) const {
    static const auto op = op_handle<NormSig>("fastclip::multi_tensor_norm");
    require_one_call("norm");
    pybind11::gil_scoped_release no_gil;
    return named_errors([&] { return op.call(tensors_, ord, per_tensor, fp64, 1); });
  }

  void scale_(const at::Tensor& coef) const {
    static const auto op = op_handle<ScaleSig>("fastclip::multi_tensor_scale_");
    require_one_call("scale_");
    pybind11::gil_scoped_release no_gil;
    named_errors([&] { op.call(tensors_, coef); });
  }

  void clamp_(double clip_value) const {
    static const auto op = op_handle<ClampSig>("fastclip::multi_tensor_clamp_");
    require_one_call("clamp_");
    pybind11::gil_scoped_release no_gil;
    named_errors([&] { op.call(tensors_, clip_value); });
  }

  at::Tensor clip_(double max_norm, double ord, bool error_if_nonfinite) const {
    static const auto op = op_handle<ClipSig>("fastclip::clip_");
    require_one_call("clip_");
    pybind11::gil_scoped_release no_gil;
    return named_errors([&] { return op.call(tensors_, max_norm, ord, error_if_nonfinite); });
  }

 private:
  // Runs an op call; an error of the op that names its argument's element,
  // "tensors[k]", names the caller's instead: `name[i]`, or `name[i].grad`
  // (items whose .grad is None are not in the op's list, so k and i differ).
  template <typename Call>
  auto named_errors(const Call& call) const -> decltype(call()) {
    try {
      return call();
    } catch (const c10::Error& e) {
      if (typeid(e) != typeid(c10::Error)) throw;  // a typed error (ValueError...) as it is
      std::string message = e.what_without_backtrace();
      static const std::string kElement = "tensors[";
      const size_t at = message.find(kElement);
      const size_t close = at == std::string::npos ? at : message.find(']', at);
      if (close == std::string::npos) throw;
      const std::string digits = message.substr(at + kElement.size(), close - at - kElement.size());
      if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) throw;
      const size_t k = std::stoull(digits);
      if (k >= positions_.size()) throw;
      message.replace(at, close + 1 - at, name_ + "[" + std::to_string(positions_[k]) + "]" + (grads_ ? ".grad" : ""));
      TORCH_CHECK(false, message);
    }
  }

  void require_one_call(const char* method) const {
    TORCH_CHECK(one_call(), "HeldTensors.", method, ": the tensors cannot go to one op call (",
                tensors_.empty() ? std::string("empty") : *why_, ")");
  }

  std::vector<at::Tensor> tensors_;
  std::vector<int64_t> positions_;  // each tensor's item in the caller's list
  bool grads_;                      // the tensors are the items' .grad
  std::string name_;                // the caller's name for the list
  std::optional<std::string> why_;  // why one op call cannot take them all
};

// A HeldTensors built under torch's warning handler: torch's warning on
// reading .grad of a non-leaf tensor (TORCH_WARN) then reaches Python's
// warnings, as when Python reads .grad, instead of stderr. The handler
// hands its warnings to Python when it ends, and throws python_error where
// a filter turns one into an error; it ends before the object is returned.
std::unique_ptr<HeldTensors> hold_with_python_warnings(const pybind11::list& items, bool grads,
                                                       const std::string& name) {
  std::unique_ptr<HeldTensors> held;
  try {
    torch::PyWarningHandler handler;
    try {
      held = std::make_unique<HeldTensors>(items, grads, name);
    } catch (...) {
      handler.set_in_exception();  // one error at a time: a warning a filter would raise is printed instead
      throw;
    }
  } catch (python_error& e) {
    e.restore();
    throw pybind11::error_already_set();
  }
  return held;
}

// The local tensors of a list of DTensors and, for each, the tuple of mesh
// dimensions that shard it (placements of `shard_types`), plus the mesh; or
// None when the list is anything else than DTensors whose spec and local
// tensor are slots, on one mesh, with only shard and replicate placements
// (no Partial, none of an unknown type). Python then takes
// the list item by item and raises its errors. Reading these attributes
// from Python costs ~1 us per DTensor (placements hash in Python).
std::optional<std::tuple<pybind11::list, pybind11::list, pybind11::object>> unwrap_dtensors(
    const pybind11::list& items, const pybind11::handle& dtensor_type, const pybind11::handle& shard_types,
    const pybind11::handle& replicate_type, const pybind11::handle& partial_type) {
  constexpr size_t kMaxMeshDims = 63;  // sharded dimensions as bits of a mask
  // Interned once (kept for the life of the process).
  static const struct {
    PyObject* spec = PyUnicode_InternFromString("_spec");
    PyObject* local_tensor = PyUnicode_InternFromString("_local_tensor");
    PyObject* mesh = PyUnicode_InternFromString("mesh");
    PyObject* placements = PyUnicode_InternFromString("placements");
  } names;
  // obj.name, or a null object (and no Python error) where it has none.
  const auto attr_or_null = [](PyObject* obj, PyObject* name) {
    PyObject* value = PyObject_GetAttr(obj, name);
    if (value == nullptr) PyErr_Clear();
    return pybind11::reinterpret_steal<pybind11::object>(value);
  };
  // Anything but a shard-like or replicated placement (Partial, a type
  // this code does not know) goes to the Python loop, which raises.
  struct PlacementKind {
    bool shard;
    bool known;
  };
  std::unordered_map<PyTypeObject*, PlacementKind> kinds;  // decided once per placement type
  std::unordered_map<uint64_t, pybind11::tuple> keys_by_mask;
  PyTypeObject* dtensor_like = nullptr;  // an item type known to be a DTensor
  pybind11::list locals, keys;
  pybind11::object mesh;
  for (size_t i = 0; i < items.size(); ++i) {
    // Held for the iteration: isinstance and attribute reads can run Python.
    const auto item = pybind11::reinterpret_borrow<pybind11::object>(PyList_GET_ITEM(items.ptr(), static_cast<Py_ssize_t>(i)));
    PyObject* obj = item.ptr();
    if (Py_TYPE(obj) != dtensor_like) {
      if (PyObject_IsInstance(obj, dtensor_type.ptr()) != 1) {
        PyErr_Clear();
        return std::nullopt;
      }
      dtensor_like = Py_TYPE(obj);
    }
    const pybind11::object spec = attr_or_null(obj, names.spec);
    const pybind11::object local = attr_or_null(obj, names.local_tensor);
    if (!spec || !local) return std::nullopt;
    const pybind11::object t_mesh = spec.attr(names.mesh);
    if (!mesh) {
      mesh = t_mesh;
    } else if (!t_mesh.is(mesh) && !t_mesh.equal(mesh)) {
      return std::nullopt;
    }
    const pybind11::object placements = spec.attr(names.placements);
    if (!PyTuple_Check(placements.ptr()) || PyTuple_GET_SIZE(placements.ptr()) > static_cast<Py_ssize_t>(kMaxMeshDims)) {
      return std::nullopt;
    }
    uint64_t mask = 0;
    for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(placements.ptr()); ++d) {
      PyObject* placement = PyTuple_GET_ITEM(placements.ptr(), d);
      auto kind = kinds.find(Py_TYPE(placement));
      if (kind == kinds.end()) {
        const int shard = PyObject_IsInstance(placement, shard_types.ptr());  // a tuple of types
        const int replicate = PyObject_IsInstance(placement, replicate_type.ptr());
        const int partial = PyObject_IsInstance(placement, partial_type.ptr());
        if (shard < 0 || replicate < 0 || partial < 0) throw pybind11::error_already_set();
        const bool known = partial != 1 && (shard == 1 || replicate == 1);
        kind = kinds.emplace(Py_TYPE(placement), PlacementKind{shard == 1, known}).first;
      }
      if (!kind->second.known) return std::nullopt;
      if (kind->second.shard) mask |= uint64_t{1} << d;
    }
    auto key = keys_by_mask.find(mask);
    if (key == keys_by_mask.end()) {
      pybind11::list dims;
      for (size_t d = 0; d < kMaxMeshDims; ++d) {
        if (mask >> d & 1u) dims.append(d);
      }
      key = keys_by_mask.emplace(mask, pybind11::tuple(dims)).first;
    }
    locals.append(local);
    keys.append(key->second);
  }
  return std::make_tuple(locals, keys, mesh ? mesh : pybind11::none());
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = FASTCLIP_VERSION;
#ifdef FASTCLIP_WITH_CUDA
  info["cuda_build"] = true;
#else
  info["cuda_build"] = false;
#endif
  const cpu::PrefetchChoice prefetch = cpu::prefetch_choice();
  info["cpu_prefetch"] = prefetch.whole_segments ? "all" : "heads";
  info["cpu_prefetch_head_bytes"] = prefetch.head_bytes;
  info["cpu_prefetch_decided_by"] = prefetch.decided_by;
  return info;
}

}  // namespace

// The checks a list op makes before it reads any data, for the fake
// kernels (fastclip/_ops.py): a graph is then refused when it is traced,
// as an eager call is (found in review: integer or sparse tensors and a
// negative max_norm passed tracing and failed only when the graph ran).
// Not check_writable: its overlap test reads sizes, which may be symbolic.
void check_list_op(const std::string& op, const std::vector<at::Tensor>& tensors, std::optional<double> ord,
                   std::optional<double> max_norm, std::optional<double> clip_value,
                   const std::optional<at::Tensor>& coef, int64_t slices) {
  const std::string name = "fastclip::" + op;
  // An empty list reaches a kernel only through multi_tensor_scale_'s coef
  // (the dispatcher has no other tensor to dispatch on), which does nothing.
  TORCH_CHECK(!tensors.empty() || coef.has_value(), name,
              ": tensors is empty; the op takes a non-empty list (fastclip's Python functions take an empty one)");
  if (!tensors.empty()) check_tensors(name.c_str(), tensors, tensors[0].device().type());
  // Under jvp(vmap(f)) the rules get the duals: refused in the op's name
  // before any of the rule's own ops run (the clip's norm op refused them
  // in its name).
  check_no_tangent(name.c_str(), tensors);
  if (coef.has_value()) check_coef(name.c_str(), *coef, tensors.empty() ? coef->device() : tensors[0].device());
  if (clip_value.has_value()) check_clip_value(name.c_str(), *clip_value);
  if (max_norm.has_value()) check_max_norm(name.c_str(), *max_norm);
  if (ord.has_value()) check_norm_order(name.c_str(), *ord);
  check_slices(name.c_str(), tensors, slices);
}

}  // namespace fastclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fastclip::HeldTensors;
  m.doc() = "fastclip: fused multi-tensor gradient norm and clipping kernels";
  m.def("first_unwritable", &fastclip::first_unwritable, pybind11::arg("tensors"),
        "(index, 'inference' | 'overlap' | 'storage') of the first tensor an in-place op would refuse, or None.");
  m.def("dense_and_apart", &fastclip::dense_and_apart, pybind11::arg("tensors"),
        "True when every tensor is one dense block and no two share bytes.");
  m.def("single_call_blocker", &fastclip::single_call_blocker, pybind11::arg("tensors"),
        "None if the tensors can go to one fastclip op call, else the reason "
        "('sparse', 'complex', 'dtype', 'devices' or 'subclass').");
  pybind11::class_<HeldTensors>(m, "HeldTensors",
                                "Gradients (or tensors) gathered in C++, with the fused ops as methods.")
      .def(pybind11::init(&fastclip::hold_with_python_warnings), pybind11::arg("items"), pybind11::arg("grads"),
           pybind11::arg("name"))
      .def("__len__", &HeldTensors::size)
      .def_property_readonly("one_call", &HeldTensors::one_call,
                             "True when the list is not empty and one op call takes it all.")
      .def_property_readonly("blocker", &HeldTensors::blocker_reason,
                             "Why one op call cannot take the list ('sparse', 'complex', 'dtype', 'devices', "
                             "'subclass', 'no kernels'), or None.")
      .def_property_readonly("device", &HeldTensors::device, "The first tensor's device.")
      .def_property_readonly("dense_and_apart", &HeldTensors::dense_and_apart,
                             "True when every tensor is one dense block and no two share bytes.")
      .def("first_unwritable", &HeldTensors::first_unwritable,
           "(index, 'inference' | 'overlap' | 'storage') of the first tensor an in-place op would refuse, or None.")
      .def("tensors", &HeldTensors::tensors, "The tensors as a Python list.")
      .def("positions", &HeldTensors::positions, "Each tensor's index in the list it was gathered from (int64 CPU tensor).")
      .def("norm", &HeldTensors::norm, pybind11::arg("ord"), pybind11::arg("per_tensor"),
           pybind11::arg("fp64") = false)
      .def("scale_", &HeldTensors::scale_, pybind11::arg("coef"))
      .def("clamp_", &HeldTensors::clamp_, pybind11::arg("clip_value"))
      .def("clip_", &HeldTensors::clip_, pybind11::arg("max_norm"), pybind11::arg("ord"),
           pybind11::arg("error_if_nonfinite"));
  m.def("unwrap_dtensors", &fastclip::unwrap_dtensors, pybind11::arg("items"), pybind11::arg("dtensor_type"),
        pybind11::arg("shard_types"), pybind11::arg("replicate_type"), pybind11::arg("partial_type"),
        "(local tensors, sharded mesh dims of each, mesh) of a list of DTensors on one mesh, or None.");
  m.def(
      "same_objects",
      [](const pybind11::iterable& items, const pybind11::tuple& kept) {
        // By identity, never __eq__ (a tensor's compares elements).
        const size_t count = kept.size();
        size_t i = 0;
        for (pybind11::handle item : items) {
          if (i == count || item.ptr() != PyTuple_GET_ITEM(kept.ptr(), i)) return false;
          ++i;
        }
        return i == count;
      },
      pybind11::arg("items"), pybind11::arg("kept"),
      "True when iterating items gives the objects of kept, the same ones in the same order.");
  m.def("set_vmap_rule", &fastclip::set_vmap_rule, pybind11::arg("op"), pybind11::arg("rule"),
        "Hands the C++ torch.vmap rule of op the Python rule, rule(*args), for the cases it leaves.");
  m.def("build_info", &fastclip::build_info, "How this extension was built, and how its CPU kernels prefetch.");
  m.def("check_list_op", &fastclip::check_list_op, pybind11::arg("op"), pybind11::arg("tensors"),
        pybind11::arg("ord") = std::nullopt, pybind11::arg("max_norm") = std::nullopt,
        pybind11::arg("clip_value") = std::nullopt, pybind11::arg("coef") = std::nullopt, pybind11::arg("slices") = 1,
        "The data-free argument checks of a list op (for its fake kernel); raises as the op would.");
  m.def(
      "check_clip_scalars",
      [](const at::Tensor& norm, double max_norm, const std::optional<at::Tensor>& loss_scale,
         const std::optional<at::Tensor>& extra_scale, const std::optional<at::Tensor>& found_inf,
         const std::optional<at::Tensor>& extra_found, const at::Tensor& last_norm, const at::Tensor& last_coef,
         const at::Tensor& skipped) {
        fastclip::check_clip_scalars("fastclip::clip_scalars_", norm, max_norm, loss_scale, extra_scale, found_inf,
                                     extra_found, last_norm, last_coef, skipped, norm.device().type());
      },
      "The argument checks of clip_scalars_ (for its fake kernel); raises as the op would.");
}
