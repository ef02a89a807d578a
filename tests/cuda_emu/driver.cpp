// C entry points (for ctypes) that run fastclip's CUDA launchers under the
// emulator of emu.h, the way the torch glue (csrc/cuda/multi_tensor_cuda.cpp)
// drives them: the table built by build_table() in host memory and copied
// ("uploaded") into a buffer that also holds the norm scratch, the scratch
// poisoned with NaN bytes first, the norm op's null outputs, and the clip's
// scale launches reading the coefficient that the norm launch left in that
// scratch. The host-side parts of the glue (argument checks, TensorTable,
// the error_if_nonfinite read, ATen's copies) are not run here. Included at the
// end of the translation unit that tests/test_cuda_emulated.py generates
// from the kernel source, so it sees the launchers and emu::config().
#include <cstdlib>
#include <exception>
#include <memory>

namespace {

constexpr size_t kAlign = 64;
constexpr unsigned char kPoisonTable = 0xA5;
constexpr unsigned char kPoisonScratch = 0xFF;  // NaN in every float type

struct Buffer {
  std::unique_ptr<char, decltype(&std::free)> bytes{nullptr, &std::free};
  explicit Buffer(size_t n, unsigned char poison) {
    const size_t rounded = (n + kAlign - 1) / kAlign * kAlign + kAlign;
    bytes.reset(static_cast<char*>(std::aligned_alloc(kAlign, rounded)));
    if (!bytes) throw std::bad_alloc();
    memset(bytes.get(), poison, rounded);
  }
  char* get() const { return bytes.get(); }
};

// A table as the glue uploads it, with `extra` bytes of scratch after it.
struct Uploaded {
  fastclip::cuda::TableLayout layout;
  Buffer device;
  fastclip::cuda::DeviceTable table;
  Uploaded(const fastclip::TensorDesc* descs, int64_t n, bool norm_scratch)
      : layout(fastclip::cuda::table_layout(n)), device(1, 0), table{} {
    Buffer host(layout.bytes, kPoisonTable);
    const int64_t chunks = fastclip::cuda::build_table(descs, n, layout, host.get());
    const size_t extra = norm_scratch ? fastclip::cuda::norm_scratch_bytes(n, chunks) : 0;
    device = Buffer(layout.bytes + extra, kPoisonScratch);
    memcpy(device.get(), host.get(), layout.bytes);
    table = fastclip::cuda::device_table(device.get(), layout, n, chunks);
  }
  void* scratch() const { return device.get() + layout.bytes; }
  fastclip::cuda::Ticket* tickets() const { return fastclip::cuda::device_tickets(device.get(), layout); }
};

// Runs fn(), turning an exception (an emulated kernel's failure) into a
// message and a nonzero return.
template <typename Fn>
int guarded(char* error, int64_t error_len, const Fn& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    if (error_len > 0) {
      strncpy(error, e.what(), static_cast<size_t>(error_len - 1));
      error[error_len - 1] = '\0';
    }
    return 1;
  }
}

// Sum of the ticket counters after a launch (the contract: 0).
uint64_t tickets_left(const Uploaded& up) {
  uint64_t left = 0;
  for (int64_t t = 0; t <= up.table.num_tensors; ++t) left += up.tickets()[t];
  return left;
}

}  // namespace

extern "C" {

void emu_configure(int workers, uint64_t seed) {
  emu::config().workers = workers;
  emu::config().seed = seed;
}

// fastclip::multi_tensor_norm as the glue runs it: no coefficient, no flag,
// max_norm 0; per_tensor may be null; total and per_tensor are float, or
// double with fp64.
int emu_norm(const fastclip::TensorDesc* descs, int64_t n, double ord, int num_sms, int fp64, void* total,
             void* per_tensor, uint64_t* tickets, int64_t* num_chunks, char* error, int64_t error_len) {
  return guarded(error, error_len, [&] {
    const Uploaded up(descs, n, true);
    fastclip::cuda::NormOutputs out{};
    fastclip::cuda::norm_scratch(up.scratch(), n, up.table.num_chunks, &out);
    out.tickets = up.tickets();
    if (fp64 != 0) {
      out.total_fp64 = static_cast<double*>(total);
      out.per_tensor_fp64 = static_cast<double*>(per_tensor);
    } else {
      out.total = static_cast<float*>(total);
      out.per_tensor = static_cast<float*>(per_tensor);
    }
    out.coef = nullptr;
    out.nonfinite = nullptr;
    fastclip::cuda::launch_norm(up.table, fastclip::make_norm_order(ord), 0.0, out, num_sms, nullptr);
    *tickets = tickets_left(up);
    *num_chunks = up.table.num_chunks;
  });
}

// fastclip::clip_ as the glue runs it: the norm launch over `read` (the
// dense tensors in place, views with gaps as contiguous copies), which
// leaves the coefficient in its scratch; the scale launch over `write` (the
// dense tensors) reading it, from the same table when nothing has gaps,
// else from a second upload; then the strided launch over the views with
// gaps. No per-tensor norms. The coefficient and the non-finite flag are
// copied out for the test to see.
int emu_clip(const fastclip::TensorDesc* read, int64_t n_read, const fastclip::TensorDesc* write, int64_t n_write,
             const fastclip::cuda::StridedView* views, int32_t n_views, double max_norm, double ord, int num_sms,
             float* total, double* coef, int32_t* nonfinite, uint64_t* tickets, char* error, int64_t error_len) {
  return guarded(error, error_len, [&] {
    const bool all_dense = n_views == 0;
    if (n_views < 0 || n_views > fastclip::cuda::kMaxViewsPerLaunch) throw std::runtime_error("too many views");
    const Uploaded up(all_dense ? write : read, all_dense ? n_write : n_read, true);
    fastclip::cuda::NormOutputs out{};
    fastclip::cuda::norm_scratch(up.scratch(), up.table.num_tensors, up.table.num_chunks, &out);
    out.tickets = up.tickets();
    out.total = total;
    out.per_tensor = nullptr;
    fastclip::cuda::launch_norm(up.table, fastclip::make_norm_order(ord), max_norm, out, num_sms, nullptr);
    const fastclip::cuda::Coefficient c{out.coef, fastclip::DType::kFloat64, 0.0};
    if (all_dense) {
      fastclip::cuda::launch_scale(up.table, c, num_sms, nullptr);
    } else {
      const Uploaded scale_up(write, n_write, false);
      fastclip::cuda::launch_scale(scale_up.table, c, num_sms, nullptr);
      fastclip::cuda::StridedViews batch{};
      for (int32_t i = 0; i < n_views; ++i) batch.views[i] = views[i];
      batch.count = n_views;
      fastclip::cuda::launch_scale_strided(batch, c, num_sms, nullptr);
    }
    *coef = *out.coef;
    *nonfinite = *out.nonfinite;
    *tickets = tickets_left(up);
  });
}

// Scale by a coefficient read from `coef_device` (of dtype coef_dtype) when
// it is not null, else coef_host.
int emu_scale(const fastclip::TensorDesc* descs, int64_t n, const void* coef_device, int32_t coef_dtype,
              double coef_host, int num_sms, char* error, int64_t error_len) {
  return guarded(error, error_len, [&] {
    const Uploaded up(descs, n, false);
    const fastclip::cuda::Coefficient c{coef_device, static_cast<fastclip::DType>(coef_dtype), coef_host};
    fastclip::cuda::launch_scale(up.table, c, num_sms, nullptr);
  });
}

int emu_clamp(const fastclip::TensorDesc* descs, int64_t n, double bound, int num_sms, char* error,
              int64_t error_len) {
  return guarded(error, error_len, [&] {
    const Uploaded up(descs, n, false);
    fastclip::cuda::launch_clamp(up.table, bound, num_sms, nullptr);
  });
}

int emu_scale_strided(const fastclip::cuda::StridedView* views, int32_t count, const void* coef_device,
                      int32_t coef_dtype, double coef_host, int num_sms, char* error, int64_t error_len) {
  return guarded(error, error_len, [&] {
    if (count < 0 || count > fastclip::cuda::kMaxViewsPerLaunch) throw std::runtime_error("too many views");
    fastclip::cuda::StridedViews batch{};
    for (int32_t i = 0; i < count; ++i) batch.views[i] = views[i];
    batch.count = count;
    const fastclip::cuda::Coefficient c{coef_device, static_cast<fastclip::DType>(coef_dtype), coef_host};
    fastclip::cuda::launch_scale_strided(batch, c, num_sms, nullptr);
  });
}

// fastclip::clip_scalars_ as the glue runs it: each input a Coefficient
// read on the device (`inputs[k]` of dtype `dtypes[k]`: norm, loss_scale,
// extra_scale, found_inf, extra_found; a null pointer is absent and reads
// as 1 for a scale, 0 for a flag); the kernel writes the logs and outputs.
int emu_clip_scalars(const void* const* inputs, const int32_t* dtypes, double max_norm, int skip_inf_divisor,
                     int count_skip, float* last_norm, float* last_coef, int64_t* skipped, double* factor,
                     float* divisor, float* found, char* error, int64_t error_len) {
  return guarded(error, error_len, [&] {
    constexpr double kAbsent[5] = {0.0, 1.0, 1.0, 0.0, 0.0};
    fastclip::cuda::Coefficient in[5];
    for (int k = 0; k < 5; ++k) in[k] = {inputs[k], static_cast<fastclip::DType>(dtypes[k]), kAbsent[k]};
    fastclip::cuda::ClipScalarsArgs args{};
    args.norm = in[0];
    args.loss_scale = in[1];
    args.extra_scale = in[2];
    args.found_inf = in[3];
    args.extra_found = in[4];
    args.max_norm = max_norm;
    args.skip_inf_divisor = skip_inf_divisor != 0;
    args.count_skip = count_skip != 0;
    args.last_norm = last_norm;
    args.last_coef = last_coef;
    args.skipped = skipped;
    args.factor = factor;
    args.divisor = divisor;
    args.found = found;
    fastclip::cuda::launch_clip_scalars(args, nullptr);
  });
}

// Self-test kernels of the emulator: a warp shuffle reached by half a warp,
// and a __syncthreads skipped by one thread, must be reported (mode 0 and
// 1); mode 2 is the same kernel with uniform control flow, which must run.
namespace selftest {
__global__ void divergent(int mode, int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (mode == 0 && threadIdx.x % 32 < 16) v += __shfl_down_sync(0xffffffffu, v, 1);
  if (mode == 1 && threadIdx.x != 5) __syncthreads();
  if (mode == 2) {
    v += __shfl_down_sync(0xffffffffu, v, 1);
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}
}  // namespace selftest

int emu_selftest(int mode, int* out, char* error, int64_t error_len) {
  return guarded(error, error_len, [&] { ::emu::Launch(2, 64, 0, nullptr).run(selftest::divergent, mode, out); });
}

}  // extern "C"
