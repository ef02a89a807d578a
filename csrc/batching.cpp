// fastclip: the torch.vmap batching rules of multi_tensor_norm and clip_
// for the common case, in C++: every tensor batched at the current level
// and at no other, no float64 data, orders 1, 2 and inf, a batch size and
// shapes that are plain integers, and (clip_) nothing the Python rule
// would refuse. They compute what the Python rules (fastclip/_ops.py)
// compute, with the same ops in the same order, so the same bits; every
// other case goes to the Python rule, which fastclip._ops hands over when
// it loads (set_vmap_rule). Why: the Python rule, torch's custom-op vmap
// helper and the Python kernel's argument conversion cost more than the
// op itself on small samples (256 samples of 12 small tensors; README,
// Known limitations).
#include <ATen/functorch/BatchedTensorImpl.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "numerics.h"
#include "ops.h"

namespace fastclip {
namespace {

// The Python rules by op name; set once at import, kept for the life of
// the process (never released: no decref after Python has finalized).
// Guarded by the GIL.
std::unordered_map<std::string, PyObject*>& python_rules() {
  static auto* rules = new std::unordered_map<std::string, PyObject*>();
  return *rules;
}

// Runs the Python rule of `name` on the op's arguments on the stack,
// leaving its results there: what torch.library's Python kernel would do.
void run_python_rule(const std::string& name, const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  pybind11::gil_scoped_acquire gil;
  const auto found = python_rules().find(name);
  TORCH_CHECK(found != python_rules().end(), "fastclip::", name,
              ": its torch.vmap rule is not registered (import fastclip first)");
  const c10::FunctionSchema& schema = op.schema();
  const size_t count = schema.arguments().size();
  pybind11::tuple args(count);
  for (size_t i = 0; i < count; ++i) args[i] = torch::jit::toPyObject(std::move((*stack)[stack->size() - count + i]));
  torch::jit::drop(*stack, count);
  // Held for the call: the rule may replace itself (set_vmap_rule) meanwhile.
  const auto rule = pybind11::reinterpret_borrow<pybind11::object>(found->second);
  const pybind11::object out = rule(*args);
  const auto& returns = schema.returns();
  if (returns.size() == 1) {
    stack->push_back(torch::jit::toIValue(out, returns[0].type()));
    return;
  }
  const auto results = out.cast<pybind11::tuple>();
  for (size_t i = 0; i < returns.size(); ++i) stack->push_back(torch::jit::toIValue(results[i], returns[i].type()));
}

// The samples of a list under the current vmap level: each tensor's
// value with its batch dimension first, where the C++ rules take the list.
struct Samples {
  int64_t level = 0;
  int64_t batch = 0;
  std::vector<at::Tensor> values;  // each tensor's value at this level
  std::vector<int64_t> dims;       // each value's batch dimension
};

bool exact_power_order(double ord) { return ord == 1.0 || ord == 2.0 || std::isinf(ord); }

// The current functorch level (torch._C._functorch.maybe_current_level),
// or nullopt outside every transform. Asked of Python: functorch's C++
// header for it needs a JSON library that torch does not ship. About a
// microsecond with the GIL taken, against the hundreds the rule saves.
std::optional<int64_t> current_level() {
  pybind11::gil_scoped_acquire gil;
  static PyObject* const ask =
      pybind11::object(pybind11::module_::import("torch._C._functorch").attr("maybe_current_level")).release().ptr();
  const pybind11::object level = pybind11::handle(ask)();
  if (level.is_none()) return std::nullopt;
  return level.cast<int64_t>();
}

// What a C++ rule takes: nullopt sends the call to the Python rule. Every
// tensor must be batched at the current level and its value at no other
// (found in review: under vmap(grad(vmap(f))), tensors batched only at the
// outer level had the rule's ops run through the grad layer between, which
// refused the in-place multiply; the Python rule passes such calls down).
std::optional<Samples> plain_samples(const std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) return std::nullopt;
  constexpr c10::DispatchKeySet kTransforms({c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                             c10::DispatchKey::Functionalize, c10::DispatchKey::BatchedNestedTensor});
  Samples s;
  for (const at::Tensor& t : tensors) {
    const at::functorch::BatchedTensorImpl* batched = at::functorch::maybeGetBatchedImpl(t);
    if (batched == nullptr) return std::nullopt;  // shared by every sample, or another transform's
    const at::Tensor& value = batched->value();
    if (s.values.empty()) {
      s.level = batched->level();
      const std::optional<int64_t> batch = value.sym_size(batched->bdim()).maybe_as_int();
      if (!batch || *batch == 0) return std::nullopt;  // symbolic, or an empty batch
      s.batch = *batch;
    }
    // Another level (nested vmap), a wrapped value, float64 (its totals
    // at the double range's edge are settled on the host) or symbolic
    // sizes: Python.
    if (batched->level() != s.level || value.key_set().has_any(kTransforms) || value.scalar_type() == at::kDouble ||
        value.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) {
      return std::nullopt;
    }
    s.values.push_back(value);
    s.dims.push_back(batched->bdim());
  }
  if (current_level() != s.level) return std::nullopt;
  return s;
}

// Each sample's float64 total and per-tensor norms ([batch] and
// [batch, tensors]): one op call over every sample's slices, one over the
// rows of their norms (_sample_norms in fastclip/_ops.py). Below the
// batching level, as the Python rule runs.
std::tuple<at::Tensor, at::Tensor> sample_norms(const Samples& s, double ord) {
  static const auto norm = op_handle<NormSig>("fastclip::multi_tensor_norm");
  const auto n = static_cast<int64_t>(s.values.size());
  std::vector<at::Tensor> rows;
  rows.reserve(s.values.size());
  for (size_t i = 0; i < s.values.size(); ++i) rows.push_back(s.dims[i] == 0 ? s.values[i] : s.values[i].movedim(s.dims[i], 0));
  const at::Tensor each = std::get<1>(norm.call(rows, ord, true, true, s.batch));
  // The Python rule's views, whose strides are returned (a transposed
  // view; the op reads its rows through a row-major copy).
  at::Tensor columns = each.view({n, s.batch, 1}).transpose(0, 1).reshape({s.batch, n});
  at::Tensor totals = std::get<1>(norm.call({columns}, ord, true, true, s.batch));
  return {std::move(totals), std::move(columns)};
}

void norm_rule(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  constexpr size_t kArgs = 5;  // tensors, ord, per_tensor, fp64, slices
  const auto args = torch::jit::last(*stack, kArgs);
  const double ord = args[1].toDouble();
  std::optional<Samples> s;
  // A symbolic `slices` (nested vmap under a dynamic compile) goes to
  // Python: toInt() made it a constant (found in review).
  const std::optional<int64_t> slices = args[4].toSymInt().maybe_as_int();
  if (slices == 1 && exact_power_order(ord)) s = plain_samples(args[0].toTensorVector());
  if (!s) return run_python_rule("multi_tensor_norm", op, stack);
  const bool per_tensor = args[2].toBool();
  const at::ScalarType dtype = args[3].toBool() ? at::kDouble : at::kFloat;
  check_list_op("multi_tensor_norm", s->values, ord, std::nullopt, std::nullopt, std::nullopt, 1);
  at::Tensor total, each;
  {
    const c10::impl::ExcludeDispatchKeyGuard below(c10::DispatchKey::FuncTorchBatched);
    auto [totals, columns] = sample_norms(*s, ord);
    total = totals.to(dtype);
    each = (per_tensor ? columns : columns.narrow(1, 0, 0)).to(dtype);
  }
  torch::jit::drop(*stack, kArgs);
  stack->emplace_back(at::functorch::makeBatched(total, 0, s->level));
  stack->emplace_back(at::functorch::makeBatched(each, 0, s->level));
}

void clip_rule(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  constexpr size_t kArgs = 4;  // tensors, max_norm, ord, error_if_nonfinite
  const auto args = torch::jit::last(*stack, kArgs);
  const double max_norm = args[1].toDouble();
  const double ord = args[2].toDouble();
  std::optional<Samples> s;
  if (!args[3].toBool() && exact_power_order(ord)) s = plain_samples(args[0].toTensorVector());
  // What the Python rule refuses (it raises its own errors): a value that
  // requires grad in grad mode, or that cannot be written in place.
  const auto refused = [](const Samples& samples) {
    if (c10::GradMode::is_enabled()) {
      for (const at::Tensor& v : samples.values)
        if (v.requires_grad()) return true;
    }
    for (const at::Tensor& v : samples.values)
      if (unwritable_reason(v) != nullptr) return true;
    return false;
  };
  if (!s || refused(*s)) return run_python_rule("clip_", op, stack);
  check_list_op("clip_", s->values, ord, max_norm, std::nullopt, std::nullopt, 1);
  at::Tensor total;
  {
    const c10::impl::ExcludeDispatchKeyGuard below(c10::DispatchKey::FuncTorchBatched);
    at::Tensor totals = std::get<0>(sample_norms(*s, ord));
    // clip_coefficient (numerics.h) as the Python rule computes it: a true division.
    at::Tensor coef = at::full_like(totals, max_norm) / (totals + kClipEpsilon);
    coef = at::where(coef.isnan() | (coef < 1.0), coef, at::ones_like(coef));
    const at::Tensor coef32 = coef.to(at::kFloat);  // no float64 data here: float32 multiplies
    for (size_t i = 0; i < s->values.size(); ++i) {
      std::vector<int64_t> shape(static_cast<size_t>(s->values[i].dim()), 1);
      shape[static_cast<size_t>(s->dims[i])] = s->batch;
      s->values[i].mul_(coef32.view(shape));
    }
    total = totals.to(at::kFloat);
  }
  torch::jit::drop(*stack, kArgs);
  stack->emplace_back(at::functorch::makeBatched(total, 0, s->level));
}

}  // namespace

void set_vmap_rule(const std::string& op, pybind11::object rule) {
  auto& rules = python_rules();
  const auto found = rules.find(op);
  if (found != rules.end()) Py_XDECREF(found->second);
  rules[op] = rule.release().ptr();
}

TORCH_LIBRARY_IMPL(fastclip, FuncTorchBatched, m) {
  m.impl("multi_tensor_norm", torch::CppFunction::makeFromBoxedFunction<&norm_rule>());
  m.impl("clip_", torch::CppFunction::makeFromBoxedFunction<&clip_rule>());
}

}  // namespace fastclip
