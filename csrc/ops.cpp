// fastclip: the op schemas (the one place they are declared), the argument
// checks every device implementation shares, and the pybind11 module.
#include "ops.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#ifndef FASTCLIP_VERSION
#define FASTCLIP_VERSION "unknown"
#endif

namespace fastclip {

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

void check_norm_order(const char* op, double ord) {
  TORCH_CHECK(ord > 0.0, op, ": ord must be a positive number or inf, got ", ord);
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
  // The order as Python prints a float (torch's message uses f"{norm_type}").
  std::string order;
  if (std::isinf(ord)) {
    order = "inf";
  } else if (ord == std::floor(ord) && std::fabs(ord) < 1e16) {
    order = std::to_string(static_cast<int64_t>(ord)) + ".0";
  } else {
    char buf[32];
    for (int digits = 1; digits <= 17; ++digits) {
      std::snprintf(buf, sizeof(buf), "%.*g", digits, ord);
      if (std::strtod(buf, nullptr) == ord) break;
    }
    order = buf;
  }
  TORCH_CHECK(false, "The total norm of order ", order,
              " for gradients from `parameters` is non-finite, so it cannot be clipped. To disable this error "
              "and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`");
}

void check_coef(const char* op, const at::Tensor& coef, const c10::Device& device) {
  TORCH_CHECK(coef.defined() && coef.numel() == 1, op,
              ": coef must be a tensor with one element, got ",
              coef.defined() ? coef.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(coef.scalar_type()), op,
              ": coef must be a floating-point tensor, got ", coef.scalar_type());
  TORCH_CHECK(coef.device().is_cpu() || coef.device() == device, op, ": coef is on ",
              coef.device(), " but the tensors are on ", device);
}

TensorTable::TensorTable(at::TensorList tensors, Access access) {
  descs_.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const DType dtype = to_dtype(t.scalar_type());
    if (t.numel() == 0 || t.is_non_overlapping_and_dense()) {
      descs_.push_back(TensorDesc{t.numel() == 0 ? nullptr : t.data_ptr(), t.numel(), dtype});
    } else if (access == kRead) {
      copies_.push_back(t.contiguous());
      descs_.push_back(TensorDesc{copies_.back().data_ptr(), t.numel(), dtype});
    } else {
      strided_.push_back(static_cast<int64_t>(i));
      descs_.push_back(TensorDesc{nullptr, 0, dtype});
    }
  }
}

}  // namespace fastclip

// The contract between Python and the kernels; one schema per op.
TORCH_LIBRARY(fastclip, m) {
  // Norm of order `ord` of all tensors seen as one vector (float32, 0-dim,
  // on their device), and, if per_tensor, the norm of each tensor (float32,
  // shape [len(tensors)]; else shape [0]).
  m.def("multi_tensor_norm(Tensor[] tensors, float ord, bool per_tensor) -> (Tensor, Tensor)");
  // tensors *= coef in place; no memory traffic at all when coef == 1.
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
  // tensors = clamp(tensors, -clip_value, clip_value) in place; NaN stays NaN.
  m.def("multi_tensor_clamp_(Tensor(a!)[] tensors, float clip_value) -> ()");
  // Fused norm -> min(1, max_norm / (norm + 1e-6)) -> scale; returns the norm.
  // error_if_nonfinite: raise torch's error instead, before anything is
  // written, when the norm is NaN or inf (this reads the norm on the host).
  m.def("clip_(Tensor(a!)[] tensors, float max_norm, float ord, bool error_if_nonfinite=False) -> Tensor");
}

namespace {

// Why `t` cannot join `first` in one op call, or nullptr.
const char* blocker(const at::Tensor& t, const at::Tensor& first) {
  if (t.layout() != at::kStrided) return "sparse";
  if (t.is_complex()) return "complex";
  if (!fastclip::supported_dtype(t.scalar_type())) return "dtype";
  if (t.device() != first.device()) return "devices";
  // DTensor and other __torch_dispatch__ subclasses: the ops would reach the
  // subclass's dispatch, which knows nothing of them; Python unwraps them first.
  if (t.key_set().has(c10::DispatchKey::Python)) return "subclass";
  return nullptr;
}

// Why a list cannot go to the ops as one call, or None when it can: the
// Python fast path asks this once per call instead of inspecting tensors
// one by one in Python (which costs ~0.1 us per attribute per tensor).
std::optional<std::string> single_call_blocker(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors) {
    if (const char* why = blocker(t, tensors[0])) return std::string(why);
  }
  return std::nullopt;
}

// The gradients of `parameters` that are not None, in order, and the
// blocker of single_call_blocker for them: one C++ pass instead of a
// Python comprehension (~70 ns per parameter) plus a check. Objects that
// are not plain tensors or Parameters are asked for `.grad` through Python,
// so subclasses that override it keep working.
std::tuple<pybind11::list, std::optional<std::string>> collect_grads(const pybind11::list& parameters) {
  pybind11::list grads;
  std::optional<at::Tensor> first;
  std::optional<std::string> why;
  // Looked up once; the reference is kept for the life of the process.
  static PyTypeObject* const parameter_type = reinterpret_cast<PyTypeObject*>(
      pybind11::object(pybind11::module_::import("torch.nn").attr("Parameter")).release().ptr());
  for (size_t i = 0; i < parameters.size(); ++i) {
    PyObject* obj = parameters[i].ptr();
    if (!THPVariable_Check(obj)) {
      throw pybind11::type_error("parameters[" + std::to_string(i) + "] is a " + Py_TYPE(obj)->tp_name +
                                 ", not a torch.Tensor");
    }
    at::Tensor grad;
    if (Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(THPVariableClass) || Py_TYPE(obj) == parameter_type) {
      grad = THPVariable_Unpack(obj).grad();
      if (!grad.defined()) continue;
      grads.append(pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(grad)));
    } else {
      pybind11::object g = parameters[i].attr("grad");
      if (g.is_none()) continue;
      if (!THPVariable_Check(g.ptr())) {
        throw pybind11::type_error("parameters[" + std::to_string(i) + "].grad is not a tensor");
      }
      grad = THPVariable_Unpack(g.ptr());
      grads.append(g);
    }
    if (!first) first = grad;
    if (!why) {
      if (const char* b = blocker(grad, *first)) why = b;
    }
  }
  return {grads, why};
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = FASTCLIP_VERSION;
#ifdef FASTCLIP_WITH_CUDA
  info["cuda_build"] = true;
#else
  info["cuda_build"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastclip: fused multi-tensor gradient norm and clipping kernels";
  m.def("single_call_blocker", &single_call_blocker, pybind11::arg("tensors"),
        "None if the tensors can go to one fastclip op call, else the reason "
        "('sparse', 'complex', 'dtype', 'devices' or 'subclass').");
  m.def("collect_grads", &collect_grads, pybind11::arg("parameters"),
        "(grads, blocker): the gradients that are not None, and single_call_blocker(grads).");
  m.def("build_info", &build_info, "How this extension was built.");
}
