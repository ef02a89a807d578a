// fastclip CUDA kernels: framework-free (raw pointers, sizes, a stream).
//
// Work is the chunk list of all tensors of one device (kChunkElems
// elements per chunk, chunks of a tensor consecutive), walked by a
// persistent grid of num_sms * kBlocksPerSm blocks.
//
// Norm, one launch:
//   1. each block reduces whole chunks into one ScaledSum per chunk (float64,
//      16-byte loads, fixed in-thread order and a fixed shuffle tree);
//   2. a tensor's chunk partials are reduced by the block that finishes its
//      last chunk (an integer ticket per tensor), over the whole block;
//   3. the last block to finish (a grid ticket) folds the tensor sums in a
//      fixed order into the per-tensor norms, the total norm, the clip
//      coefficient and the non-finite flag.
//   Every partial depends only on its chunk's data, never on which block or
//   how many blocks ran: results are bitwise reproducible, with no
//   floating-point atomics and nothing read back to the host.
// Overflow: where a power sum can leave the double range (fp64 data, or a
//   general order p), values are accumulated scaled: for p = 1, 2 by 2^e, e
//   the exponent of the largest |x| seen so far, with exact power-of-two
//   rescaling when e grows; for a general p by the largest |x| seen itself
//   (its term is exactly 1, so no order p underflows it). This replaces the
//   CPU's second "rescue" pass: one pass, no decision on the host, and
//   nothing between the norm and the scale launch.
// Scale and clamp: one launch each, in place, 16-byte loads and stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstring>
#include <type_traits>

#include "multi_tensor_kernels.h"

namespace fastclip {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
// 16-byte vectors (uint4): the widest global load a thread can issue.
constexpr int kVecBytes = 16;
// Vectors each thread loads before using any: four independent 16-byte
// loads in flight per thread (see kBlocksPerSm).
constexpr int kUnroll = 4;
// A general order p calls pow() per element: compute-bound, so one load in
// flight per thread is enough, and pow needs more than the 64 registers per
// thread of kBlocksPerSm (it spills there on sm_90): half the blocks.
constexpr int kUnrollPow = 1;
constexpr int kBlocksPerSmPow = kBlocksPerSm / 2;

constexpr int norm_blocks_per_sm(NormKind k) { return k == NormKind::kP ? kBlocksPerSmPow : kBlocksPerSm; }
// Smallest scaling exponent: 2^-e is then at most 2^1022, a normal double,
// and values below 2^-1022 (subnormals) still scale into [0, 1).
constexpr int kMinScaleExp = -1022;
// Largest: 2^1024 is not a double. Values of 2^1023 and above (fp64 only)
// then scale into [1, 2), whose squares cannot overflow either.
constexpr int kMaxScaleExp = 1023;
// Alignment of every region of the uploaded table and the scratch buffer.
constexpr size_t kRegionAlign = 16;

size_t align_up(size_t n) { return (n + kRegionAlign - 1) / kRegionAlign * kRegionAlign; }

// ------------------------------------------------------------- elements
// Storage type, compute type (float for fp32/fp16/bf16 as torch's opmath,
// double for fp64) and the conversions of 16-byte vectors.
template <DType D>
struct Elem;

template <>
struct Elem<DType::kFloat32> {
  using storage = float;
  using compute = float;
  static constexpr int kPerVec = 4;
  __device__ static float load(float x) { return x; }
  __device__ static float store(float v) { return v; }
  __device__ static void unpack(const uint4& r, float (&v)[kPerVec]) {
    v[0] = __uint_as_float(r.x);
    v[1] = __uint_as_float(r.y);
    v[2] = __uint_as_float(r.z);
    v[3] = __uint_as_float(r.w);
  }
  __device__ static uint4 pack(const float (&v)[kPerVec]) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};

template <>
struct Elem<DType::kFloat64> {
  using storage = double;
  using compute = double;
  static constexpr int kPerVec = 2;
  __device__ static double load(double x) { return x; }
  __device__ static double store(double v) { return v; }
  __device__ static void unpack(const uint4& r, double (&v)[kPerVec]) {
    v[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    v[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  __device__ static uint4 pack(const double (&v)[kPerVec]) {
    return make_uint4(static_cast<unsigned>(__double2loint(v[0])), static_cast<unsigned>(__double2hiint(v[0])),
                      static_cast<unsigned>(__double2loint(v[1])), static_cast<unsigned>(__double2hiint(v[1])));
  }
};

// 16-bit types: two per 32-bit word, element 2i in the low half. The
// conversions are single hardware instructions (exact widening; rounding to
// nearest even with overflow to inf when narrowing).
template <DType D>
struct Elem16 {
  using storage = uint16_t;
  using compute = float;
  static constexpr int kPerVec = 8;
  __device__ static float load(uint16_t h) {
    return D == DType::kFloat16 ? __half2float(__ushort_as_half(h)) : bf16_to_float(h);
  }
  __device__ static unsigned pack2(float lo, float hi) {
    unsigned u;
    if (D == DType::kFloat16) {
      const __half2 h = __floats2half2_rn(lo, hi);
      memcpy(&u, &h, sizeof(u));
    } else {
      const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      memcpy(&u, &h, sizeof(u));
    }
    return u;
  }
  __device__ static uint16_t store(float v) {
    return static_cast<uint16_t>(pack2(v, 0.0f) & 0xFFFFu);
  }
  __device__ static void unpack(const uint4& r, float (&v)[kPerVec]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = load(static_cast<uint16_t>(w[i] & 0xFFFFu));
      v[2 * i + 1] = load(static_cast<uint16_t>(w[i] >> 16));
    }
  }
  __device__ static uint4 pack(const float (&v)[kPerVec]) {
    return make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
  }
};

template <>
struct Elem<DType::kFloat16> : Elem16<DType::kFloat16> {};
template <>
struct Elem<DType::kBFloat16> : Elem16<DType::kBFloat16> {};

// A chunk as a misaligned head (elements before the first 16-byte
// boundary), whole vectors, and a tail. torch data pointers are aligned to
// their element size, so a view at any element offset (x[1:]) still takes
// the vector path after at most kPerVec - 1 scalar elements.
struct Split {
  int64_t head;
  int64_t vectors;
  int64_t tail_begin;
};

template <DType D>
__device__ Split split_chunk(const void* first, int64_t size) {
  using E = Elem<D>;
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(first) % kVecBytes);
  int64_t head = misalign == 0 ? 0 : (kVecBytes - misalign) / static_cast<int64_t>(sizeof(typename E::storage));
  head = head < size ? head : size;
  const int64_t vectors = (size - head) / E::kPerVec;
  return Split{head, vectors, head + vectors * E::kPerVec};
}

// The calling thread's share of one chunk x[0, size): its head element,
// its 16-byte vectors (kLoads loads issued before any is used), then its
// tail element, always in that order. T may be const (norm) or not (scale,
// clamp); element(T*) and vector(const uint4&, V*) see each piece once.
template <DType D, int kLoads, typename T, typename Element, typename Vector>
__device__ void walk_chunk(T* x, int64_t size, const Element& element, const Vector& vector) {
  using V = std::conditional_t<std::is_const<T>::value, const uint4, uint4>;
  const Split s = split_chunk<D>(x, size);
  if (threadIdx.x < s.head) element(x + threadIdx.x);
  V* vec = reinterpret_cast<V*>(x + s.head);
  for (int64_t base = threadIdx.x; base < s.vectors; base += int64_t{kThreads} * kLoads) {
    uint4 r[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (base + u * kThreads < s.vectors) r[u] = vec[base + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (base + u * kThreads < s.vectors) vector(r[u], vec + base + u * kThreads);
    }
  }
  if (s.tail_begin + threadIdx.x < size) element(x + s.tail_begin + threadIdx.x);
}

// ----------------------------------------------------------- power sums
template <NormKind K>
__device__ double power(double a, double p) {
  if (K == NormKind::kOne) return a;
  if (K == NormKind::kTwo) return a * a;
  return pow(a, p);
}

// Two power sums of possibly different scales (tensors of different dtypes,
// or scaled and plain sums): aligned to the larger scale, so ratios are
// <= 1, nothing overflows, and only negligible terms can underflow. A zero
// sum carries no scale and is skipped.
template <NormKind K>
__device__ ScaledSum combine(const ScaledSum& a, const ScaledSum& b, double p) {
  if (K == NormKind::kInf) return ScaledSum{nan_max(a.sum, b.sum), 1.0};
  if (b.sum == 0.0) return a;
  if (a.sum == 0.0) return b;
  const NormOrder order{K, p};
  const double top = a.scale > b.scale ? a.scale : b.scale;
  return ScaledSum{rescale_sum(order, a.sum, a.scale, top) + rescale_sum(order, b.sum, b.scale, top), top};
}

template <NormKind K>
struct Combine {
  __device__ ScaledSum operator()(const ScaledSum& a, const ScaledSum& b, double p) const { return combine<K>(a, b, p); }
};

// Per-thread accumulator. Plain: a float64 sum (or max for inf).
template <NormKind K, bool kScaled>
struct Accumulator {
  double sum = 0.0;
  __device__ explicit Accumulator(double) {}
  __device__ void add(double v) {
    if (K == NormKind::kTwo) sum = fma(v, v, sum);
    if (K == NormKind::kOne) sum += fabs(v);
    if (K == NormKind::kInf) sum = nan_max(sum, fabs(v));
  }
  __device__ ScaledSum result() const { return ScaledSum{sum, 1.0}; }
  // Partials of one chunk share the scale 1: a plain sum (or max).
  struct Merge {
    __device__ ScaledSum operator()(const ScaledSum& a, const ScaledSum& b, double) const {
      return K == NormKind::kInf ? ScaledSum{nan_max(a.sum, b.sum), 1.0} : ScaledSum{a.sum + b.sum, 1.0};
    }
  };
};

// Scaled, p = 1, 2 (fp64 data): sum of (|x| * 2^-exp)^p, where every |x|
// seen is below 2^exp (or 2^kMaxScaleExp). A larger |x| raises exp and
// rescales the sum by an exact power of two; this happens at most a few
// times per thread and chunk. inf and NaN are never compared into exp:
// they make the sum inf or NaN, as they make torch's norm.
template <NormKind K>
struct Accumulator<K, true> {
  double sum = 0.0;
  double limit = ldexp(1.0, kMinScaleExp);  // 2^exp: the first magnitude that needs a larger exp
  double scale = ldexp(1.0, -kMinScaleExp);  // 2^-exp
  double p;
  __device__ explicit Accumulator(double order_p) : p(order_p) {}
  __device__ void add(double v) {
    const double a = fabs(v);
    if (a >= limit && a <= DBL_MAX) grow(a);
    sum += power<K>(a * scale, p);
  }
  __device__ void grow(double a) {
    int e = 0;
    frexp(a, &e);  // a = m * 2^e, 0.5 <= m < 1, and e > exp
    e = e < kMaxScaleExp ? e : kMaxScaleExp;
    const double next = ldexp(1.0, e);
    sum = rescale_sum(NormOrder{K, p}, sum, limit, next);
    limit = e == kMaxScaleExp ? INFINITY : next;  // nothing finite needs more
    scale = ldexp(1.0, -e);
  }
  __device__ ScaledSum result() const { return ScaledSum{sum, 1.0 / scale}; }
  using Merge = Combine<K>;
};

// Scaled, a general order p: sum of (|x| / top)^p, top the largest finite
// |x| seen, whose own term is exactly 1. A larger |x| rescales the sum by
// (top / |x|)^p. A sum that is still 0 has top 0 and carries no scale.
template <>
struct Accumulator<NormKind::kP, true> {
  double sum = 0.0;
  double top = 0.0;
  double p;
  __device__ explicit Accumulator(double order_p) : p(order_p) {}
  __device__ void add(double v) {
    const double a = fabs(v);
    if (a > top && a <= DBL_MAX) {
      sum = rescale_sum(NormOrder{NormKind::kP, p}, sum, top, a);
      top = a;
    }
    // a == 0 adds nothing (and 0 / 0 would be NaN); inf and NaN make the
    // sum inf or NaN.
    if (a != 0.0) sum += ratio_power(NormOrder{NormKind::kP, p}, a, top);
  }
  __device__ ScaledSum result() const { return ScaledSum{sum, top}; }
  using Merge = Combine<NormKind::kP>;
};

__device__ ScaledSum shfl_down(const ScaledSum& v, int offset) {
  return ScaledSum{__shfl_down_sync(kFullMask, v.sum, offset), __shfl_down_sync(kFullMask, v.scale, offset)};
}

// Fixed-order tree over the block: shuffles within each warp, then warp 0
// over the warp results. `identity` must leave any value unchanged under
// `merge`. The result is valid in thread 0.
template <typename Merge>
__device__ ScaledSum block_reduce(ScaledSum v, ScaledSum identity, double p, ScaledSum* warp_sums, const Merge& merge) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = merge(v, shfl_down(v, offset), p);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : identity;
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = merge(v, shfl_down(v, offset), p);
  }
  __syncthreads();  // warp_sums may be reused at once
  return v;
}

// The tensor that owns chunk c: the last t with chunk_start[t] <= c (empty
// tensors share their successor's start). `hint`, the previous answer of
// this warp, is kept when it still owns c (big tensors span many rounds of
// the grid); else the warp searches 32-ary with one ballot per round
// (3 rounds for 10,000 tensors). Must be called by whole warps.
__device__ int64_t find_tensor(const DeviceTable& table, int64_t c, int64_t hint) {
  const int64_t* starts = table.chunk_start;
  if (starts[hint] <= c && c < starts[hint + 1]) return hint;
  const int lane = threadIdx.x % kWarpSize;
  int64_t lo = 0;  // starts[0] = 0 <= c: the answer is in [lo, hi)
  int64_t hi = table.num_tensors;
  while (hi - lo > 1) {
    const int64_t step = (hi - lo + kWarpSize - 1) / kWarpSize;
    const int64_t probe = lo + lane * step;
    const unsigned ok = __ballot_sync(kFullMask, probe < hi && starts[probe] <= c);
    lo += (kWarpSize - 1 - __clz(static_cast<int>(ok))) * step;  // starts is sorted: ok is a prefix of lanes
    hi = hi < lo + step ? hi : lo + step;
  }
  return lo;
}

// The elements of chunk c: its tensor and [begin, begin + size).
struct ChunkSpan {
  int64_t tensor;
  int64_t begin;
  int64_t size;
};

__device__ ChunkSpan chunk_span(const DeviceTable& table, int64_t c, int64_t hint) {
  const int64_t t = find_tensor(table, c, hint);
  const int64_t begin = (c - table.chunk_start[t]) * kChunkElems;
  const int64_t left = table.tensors[t].numel - begin;
  return ChunkSpan{t, begin, left < kChunkElems ? left : kChunkElems};
}

// ------------------------------------------------------------------ norm
// Power sum of one chunk (valid in thread 0). Each thread adds its head
// element, then its vectors in order, then its tail element.
template <NormKind K, DType D>
__device__ ScaledSum chunk_sum(const void* data, int64_t begin, int64_t size, double p, ScaledSum* warp_sums) {
  using E = Elem<D>;
  using T = typename E::storage;
  constexpr bool kScaled = K == NormKind::kP || (D == DType::kFloat64 && K != NormKind::kInf);
  using Acc = Accumulator<K, kScaled>;
  constexpr int kLoads = K == NormKind::kP ? kUnrollPow : kUnroll;
  Acc acc(p);
  walk_chunk<D, kLoads>(
      static_cast<const T*>(data) + begin, size, [&](const T* e) { acc.add(E::load(*e)); },
      [&](const uint4& r, const uint4*) {
        typename E::compute v[E::kPerVec];
        E::unpack(r, v);
#pragma unroll
        for (int j = 0; j < E::kPerVec; ++j) acc.add(v[j]);
      });
  const ScaledSum identity = Acc(p).result();
  return block_reduce(acc.result(), identity, p, warp_sums, typename Acc::Merge{});
}

__device__ ScaledSum load_sum(const ScaledSum* s) {
  // L2 loads: the sums were written by other blocks (L1 is not coherent).
  return ScaledSum{__ldcg(&s->sum), __ldcg(&s->scale)};
}

// The sum of no elements (a zero sum carries no scale).
__device__ ScaledSum zero_sum() { return ScaledSum{0.0, 1.0}; }

template <NormKind K>
__global__ void __launch_bounds__(kThreads, norm_blocks_per_sm(K))
    norm_kernel(DeviceTable table, NormOrder order, double max_norm, NormOutputs out) {
  __shared__ ScaledSum warp_sums[kWarps];
  __shared__ bool reduce_tensor;
  __shared__ bool last_block;
  const double p = order.p;
  int64_t hint = 0;

  for (int64_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const ChunkSpan span = chunk_span(table, c, hint);
    hint = span.tensor;
    const TensorDesc d = table.tensors[span.tensor];
    ScaledSum part;
    switch (d.dtype) {
      case DType::kFloat32:
        part = chunk_sum<K, DType::kFloat32>(d.data, span.begin, span.size, p, warp_sums);
        break;
      case DType::kFloat64:
        part = chunk_sum<K, DType::kFloat64>(d.data, span.begin, span.size, p, warp_sums);
        break;
      case DType::kFloat16:
        part = chunk_sum<K, DType::kFloat16>(d.data, span.begin, span.size, p, warp_sums);
        break;
      default:
        part = chunk_sum<K, DType::kBFloat16>(d.data, span.begin, span.size, p, warp_sums);
    }

    const int64_t first = table.chunk_start[span.tensor];
    const int64_t count = table.chunk_start[span.tensor + 1] - first;
    if (count == 1) {
      if (threadIdx.x == 0) out.tensor_sums[span.tensor] = part;
      continue;
    }
    // Publish the partial, then count it; the block that counts the
    // tensor's last chunk reduces all of its partials.
    if (threadIdx.x == 0) {
      out.chunk_partials[c] = part;
      __threadfence();
      reduce_tensor = atomicAdd(&out.tickets[span.tensor], Ticket{1}) == static_cast<Ticket>(count - 1);
      __threadfence();
    }
    __syncthreads();
    if (reduce_tensor) {
      ScaledSum acc = zero_sum();
#pragma unroll 4
      for (int64_t i = threadIdx.x; i < count; i += kThreads) acc = combine<K>(acc, load_sum(&out.chunk_partials[first + i]), p);
      acc = block_reduce(acc, zero_sum(), p, warp_sums, Combine<K>{});
      if (threadIdx.x == 0) {
        out.tensor_sums[span.tensor] = acc;
        out.tickets[span.tensor] = 0;  // ready for the next launch
      }
    }
  }

  // Every tensor sum of this block is written; the last block finalizes.
  if (threadIdx.x == 0) {
    __threadfence();
    last_block = atomicAdd(&out.tickets[table.num_tensors], Ticket{1}) == static_cast<Ticket>(gridDim.x - 1);
    __threadfence();
  }
  __syncthreads();
  if (!last_block) return;

  ScaledSum acc = zero_sum();
  for (int64_t t = threadIdx.x; t < table.num_tensors; t += kThreads) {
    const bool empty = table.chunk_start[t + 1] == table.chunk_start[t];
    const ScaledSum s = empty ? zero_sum() : load_sum(&out.tensor_sums[t]);
    if (out.per_tensor != nullptr || out.per_tensor_fp64 != nullptr) {
      const double each = root_scaled(order, s.sum, s.scale);
      if (out.per_tensor != nullptr) out.per_tensor[t] = static_cast<float>(each);
      if (out.per_tensor_fp64 != nullptr) out.per_tensor_fp64[t] = each;
    }
    acc = combine<K>(acc, s, p);
  }
  acc = block_reduce(acc, zero_sum(), p, warp_sums, Combine<K>{});
  if (threadIdx.x == 0) {
    const double norm = root_scaled(order, acc.sum, acc.scale);
    if (out.total != nullptr) *out.total = static_cast<float>(norm);
    if (out.total_fp64 != nullptr) *out.total_fp64 = norm;
    if (out.coef != nullptr) *out.coef = clip_coefficient(max_norm, norm);
    if (out.nonfinite != nullptr) *out.nonfinite = (is_nan(norm) || is_inf(norm)) ? 1 : 0;
    out.tickets[table.num_tensors] = 0;  // ready for the next launch
  }
}

// ------------------------------------------------------ scale and clamp
// In-place op(v) over one chunk (kUnroll vectors loaded before any store).
template <DType D, typename Op>
__device__ void update_chunk(void* data, int64_t begin, int64_t size, const Op& op) {
  using E = Elem<D>;
  using T = typename E::storage;
  walk_chunk<D, kUnroll>(
      static_cast<T*>(data) + begin, size, [&](T* e) { *e = E::store(op(E::load(*e))); },
      [&](const uint4& r, uint4* dst) {
        typename E::compute v[E::kPerVec];
        E::unpack(r, v);
#pragma unroll
        for (int j = 0; j < E::kPerVec; ++j) v[j] = op(v[j]);
        *dst = E::pack(v);
      });
}

// x * c: fp32 and 16-bit types multiply in float (torch's opmath), fp64 in
// double, so the coefficient is rounded once per dtype, as on the CPU.
template <typename C>
struct Mul {
  C c;
  __device__ C operator()(C v) const { return v * c; }
};

struct ScaleBy {
  double coef;
  template <typename C>
  __device__ Mul<C> op() const {
    return Mul<C>{static_cast<C>(coef)};
  }
};

// x * c in double, rounded once: for a coefficient that float would make
// subnormal (scale_needs_double); a kernel of its own keeps the common
// loop as it is.
template <typename C>
struct MulWide {
  double c;
  __device__ C operator()(C v) const { return static_cast<C>(static_cast<double>(v) * c); }
};

struct ScaleWide {
  double coef;
  template <typename C>
  __device__ MulWide<C> op() const {
    return MulWide<C>{coef};
  }
};

// NaN compares false both ways and is kept, as torch.clamp keeps it.
template <typename C>
struct Clamp {
  C lo;
  C hi;
  __device__ C operator()(C v) const {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
  }
};

struct ClampTo {
  double bound;
  template <typename C>
  __device__ Clamp<C> op() const {
    const C hi = static_cast<C>(bound);
    return Clamp<C>{-hi, hi};
  }
};

// Runs update.op<compute type>() over every chunk. Chunks are visited from
// the last to the first: after the norm kernel walked them first to last,
// the most recently read ones are the likeliest to still be in L2.
template <typename Update>
__device__ void update_all(const DeviceTable& table, const Update& update) {
  int64_t hint = 0;
  for (int64_t k = blockIdx.x; k < table.num_chunks; k += gridDim.x) {
    const ChunkSpan span = chunk_span(table, table.num_chunks - 1 - k, hint);
    hint = span.tensor;
    const TensorDesc d = table.tensors[span.tensor];
    switch (d.dtype) {
      case DType::kFloat32:
        update_chunk<DType::kFloat32>(d.data, span.begin, span.size, update.template op<float>());
        break;
      case DType::kFloat64:
        update_chunk<DType::kFloat64>(d.data, span.begin, span.size, update.template op<double>());
        break;
      case DType::kFloat16:
        update_chunk<DType::kFloat16>(d.data, span.begin, span.size, update.template op<float>());
        break;
      default:
        update_chunk<DType::kBFloat16>(d.data, span.begin, span.size, update.template op<float>());
    }
  }
}

__device__ double load_coefficient(const Coefficient& coef) {
  if (coef.device == nullptr) return coef.host;
  switch (coef.dtype) {
    case DType::kFloat32:
      return *static_cast<const float*>(coef.device);
    case DType::kFloat64:
      return *static_cast<const double*>(coef.device);
    case DType::kFloat16:
      return __half2float(*static_cast<const __half*>(coef.device));
    default:
      return bf16_to_float(*static_cast<const uint16_t*>(coef.device));
  }
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) scale_kernel(DeviceTable table, Coefficient coef) {
  const double c = load_coefficient(coef);
  if (c == 1.0) return;  // the contract: no gradient bytes touched
  if (scale_needs_double(c)) {
    update_all(table, ScaleWide{c});
  } else {
    update_all(table, ScaleBy{c});
  }
}

// Grid: y is the view, x walks its elements; the offset of element i is
// found from its multi-index (row-major, last dimension fastest).
template <typename Update>
__device__ void update_view(const StridedView& v, const Update& update) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < v.numel; i += int64_t{gridDim.x} * kThreads) {
    int64_t rest = i;
    int64_t offset = 0;
    for (int d = v.dims - 1; d >= 0; --d) {
      offset += rest % v.sizes[d] * v.strides[d];
      rest /= v.sizes[d];
    }
    switch (v.dtype) {
      case DType::kFloat32: {
        float* x = static_cast<float*>(v.data) + offset;
        *x = update.template op<float>()(*x);
        break;
      }
      case DType::kFloat64: {
        double* x = static_cast<double*>(v.data) + offset;
        *x = update.template op<double>()(*x);
        break;
      }
      case DType::kFloat16: {
        uint16_t* x = static_cast<uint16_t*>(v.data) + offset;
        *x = Elem<DType::kFloat16>::store(update.template op<float>()(Elem<DType::kFloat16>::load(*x)));
        break;
      }
      default: {
        uint16_t* x = static_cast<uint16_t*>(v.data) + offset;
        *x = Elem<DType::kBFloat16>::store(update.template op<float>()(Elem<DType::kBFloat16>::load(*x)));
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    scale_strided_kernel(const __grid_constant__ StridedViews views, Coefficient coef) {
  const double c = load_coefficient(coef);
  if (c == 1.0) return;  // the contract: no gradient bytes touched
  const StridedView& v = views.views[blockIdx.y];
  if (scale_needs_double(c)) {
    update_view(v, ScaleWide{c});
  } else {
    update_view(v, ScaleBy{c});
  }
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm) clamp_kernel(DeviceTable table, double bound) {
  update_all(table, ClampTo{bound});
}

// A handful of scalars: one thread, so that a step's arithmetic on them is
// one launch instead of one per operation.
__global__ void __launch_bounds__(1) clip_scalars_kernel(ClipScalarsArgs a) {
  const bool found_in = load_coefficient(a.found_inf) > 0.0 || load_coefficient(a.extra_found) > 0.0;
  const StepScalars s = step_scalars(load_coefficient(a.norm), a.max_norm, load_coefficient(a.loss_scale),
                                     load_coefficient(a.extra_scale), found_in, a.skip_inf_divisor);
  *a.last_norm = static_cast<float>(s.norm);
  *a.last_coef = static_cast<float>(s.coef);
  if (a.count_skip && s.found) *a.skipped += 1;
  *a.factor = s.factor;
  *a.divisor = s.divisor;
  *a.found = s.found ? 1.0f : 0.0f;
}

}  // namespace

// ------------------------------------------------------------ host side
TableLayout table_layout(int64_t num_tensors) {
  const auto n = static_cast<size_t>(num_tensors);
  TableLayout layout{};
  layout.tensors = 0;
  layout.chunk_start = align_up(n * sizeof(TensorDesc));
  layout.tickets = align_up(layout.chunk_start + (n + 1) * sizeof(int64_t));
  layout.bytes = align_up(layout.tickets + (n + 1) * sizeof(Ticket));
  return layout;
}

int64_t build_table(const TensorDesc* descs, int64_t num_tensors, const TableLayout& layout, void* host) {
  char* base = static_cast<char*>(host);
  const auto n = static_cast<size_t>(num_tensors);
  if (n > 0) memcpy(base + layout.tensors, descs, n * sizeof(TensorDesc));
  auto* starts = reinterpret_cast<int64_t*>(base + layout.chunk_start);
  int64_t chunks = 0;
  for (size_t t = 0; t < n; ++t) {
    starts[t] = chunks;
    chunks += (descs[t].numel + kChunkElems - 1) / kChunkElems;
  }
  starts[n] = chunks;
  memset(base + layout.tickets, 0, (n + 1) * sizeof(Ticket));
  return chunks;
}

DeviceTable device_table(const void* device, const TableLayout& layout, int64_t num_tensors, int64_t num_chunks) {
  const char* base = static_cast<const char*>(device);
  return DeviceTable{reinterpret_cast<const TensorDesc*>(base + layout.tensors),
                     reinterpret_cast<const int64_t*>(base + layout.chunk_start), num_tensors, num_chunks};
}

Ticket* device_tickets(void* device, const TableLayout& layout) {
  return reinterpret_cast<Ticket*>(static_cast<char*>(device) + layout.tickets);
}

size_t norm_scratch_bytes(int64_t num_tensors, int64_t num_chunks) {
  return align_up(static_cast<size_t>(num_chunks) * sizeof(ScaledSum)) +
         align_up(static_cast<size_t>(num_tensors) * sizeof(ScaledSum)) + align_up(sizeof(double)) +
         align_up(sizeof(int32_t));
}

void norm_scratch(void* scratch, int64_t num_tensors, int64_t num_chunks, NormOutputs* out) {
  char* p = static_cast<char*>(scratch);
  out->chunk_partials = reinterpret_cast<ScaledSum*>(p);
  p += align_up(static_cast<size_t>(num_chunks) * sizeof(ScaledSum));
  out->tensor_sums = reinterpret_cast<ScaledSum*>(p);
  p += align_up(static_cast<size_t>(num_tensors) * sizeof(ScaledSum));
  out->coef = reinterpret_cast<double*>(p);
  p += align_up(sizeof(double));
  out->nonfinite = reinterpret_cast<int32_t*>(p);
}

int grid_size(int64_t num_chunks, int num_sms, int blocks_per_sm) {
  const int64_t wanted = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * blocks_per_sm;
  const int64_t blocks = num_chunks < wanted ? num_chunks : wanted;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

void launch_norm(const DeviceTable& table, NormOrder order, double max_norm, const NormOutputs& out, int num_sms,
                 cudaStream_t stream) {
  const int grid = grid_size(table.num_chunks, num_sms, norm_blocks_per_sm(order.kind));
  switch (order.kind) {
    case NormKind::kTwo:
      norm_kernel<NormKind::kTwo><<<grid, kThreads, 0, stream>>>(table, order, max_norm, out);
      break;
    case NormKind::kOne:
      norm_kernel<NormKind::kOne><<<grid, kThreads, 0, stream>>>(table, order, max_norm, out);
      break;
    case NormKind::kInf:
      norm_kernel<NormKind::kInf><<<grid, kThreads, 0, stream>>>(table, order, max_norm, out);
      break;
    default:
      norm_kernel<NormKind::kP><<<grid, kThreads, 0, stream>>>(table, order, max_norm, out);
  }
}

void launch_scale(const DeviceTable& table, const Coefficient& coef, int num_sms, cudaStream_t stream) {
  if (table.num_chunks == 0) return;
  scale_kernel<<<grid_size(table.num_chunks, num_sms, kBlocksPerSm), kThreads, 0, stream>>>(table, coef);
}

void launch_scale_strided(const StridedViews& views, const Coefficient& coef, int num_sms, cudaStream_t stream) {
  if (views.count == 0) return;
  int64_t most = 0;
  for (int i = 0; i < views.count; ++i) most = views.views[i].numel > most ? views.views[i].numel : most;
  // The SMs are shared by the views: each gets its share of the usual grid.
  const int per_view = (grid_size((most + kThreads - 1) / kThreads, num_sms, kBlocksPerSm) + views.count - 1) / views.count;
  const dim3 grid(static_cast<unsigned>(per_view), static_cast<unsigned>(views.count));
  scale_strided_kernel<<<grid, kThreads, 0, stream>>>(views, coef);
}

void launch_clamp(const DeviceTable& table, double bound, int num_sms, cudaStream_t stream) {
  if (table.num_chunks == 0) return;
  clamp_kernel<<<grid_size(table.num_chunks, num_sms, kBlocksPerSm), kThreads, 0, stream>>>(table, bound);
}

void launch_clip_scalars(const ClipScalarsArgs& args, cudaStream_t stream) {
  clip_scalars_kernel<<<1, 1, 0, stream>>>(args);
}

}  // namespace cuda
}  // namespace fastclip
