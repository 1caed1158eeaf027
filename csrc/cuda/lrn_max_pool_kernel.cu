// Fused local response normalisation (across channels) + max pooling (non-overlapping kh x kw
// windows of each frame) on CUDA, channels_last_3d in and out: the ReLU'd convolution output is
// read once and only the pooled output is written.
//
// One block takes a run of `positions` consecutive output positions (n, t, i, j), in memory
// order of the output; its threads are (position, channel group): consecutive threads take
// consecutive groups of L = 16 / sizeof(T) channels of the same position (4 float32, 8
// float16/bfloat16, 2 float64), so a warp's loads and stores are consecutive 16-byte vectors
// (one vector each when C is a multiple of L and the tensors are 16-byte aligned; L scalar
// accesses otherwise). For each element (dy, dx) of the pool window, in lockstep:
//   1. load: each thread reads its L channels of input pixel (i*kh + dy, j*kw + dx), keeps them
//      in registers as float (double for float64) and writes their squares to its position's
//      row of shared memory; the row is zero-padded by size/2 channels before and (size-1)/2
//      after, so the LRN window never needs a bounds check;
//   2. (barrier) normalise: the thread sums the `size` squares around its first channel from
//      shared memory (channels of neighbouring threads included), then slides the window across
//      its other channels (add the square entering, subtract the one leaving), computes
//      y = x * (k + alpha/size * sum)^-beta (rsqrt for beta = 0.5) and folds y into the running
//      maximum of each channel (NaN propagates, as in max pooling);
//   3. (barrier) the row may be overwritten by the next window element.
// A window element outside the frame (the partial border window of ceil_mode) is skipped by its
// position's threads, which still take part in the barriers. Finally each thread rounds its L
// maxima once to T and stores them (rounding is monotone, so max then round = round then max).
//
// The phases are __host__ __device__ functions of (block, thread), and the launch plan is a host
// function shared with the launcher, so tools/emulate_lrn_max_pool.cu runs this code itself per
// thread and block without a GPU.
#include "cuda/lrn_max_pool_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// Unrolled on the device (so the per-thread channel arrays stay in registers); the host
// compiler, which builds the emulation, does not know the pragma.
#ifdef __CUDA_ARCH__
#define LRN_POOL_UNROLL _Pragma("unroll")
#else
#define LRN_POOL_UNROLL
#endif

namespace vidconv {
namespace cuda {
namespace lrn_pool {

constexpr int kTargetThreads = 256;
constexpr int kMaxThreads = 1024;
constexpr int kMaxSmem = 48 * 1024;

// Which block shape a launch uses: computed on the host, passed to the kernel by value.
struct Plan {
  int lanes;        // channels per thread, L = 16 / sizeof(T)
  bool vector;      // one 16-byte access per thread (C % L == 0, both pointers 16-byte aligned)
  int groups;       // channel groups per position, ceil(C / L)
  int positions;    // output positions per block
  int threads;      // block size: groups * positions rounded up to a warp
  int row;          // shared-memory entries per position: C + size - 1
  int lo, hi;       // LRN window: channels before and after the centre
  int smem_bytes;   // dynamic shared memory
  int64_t outputs;  // output positions, frames * ho * wo
  int64_t blocks;
};

inline int element_bytes(LrnPoolType type) {
  switch (type) {
    case LrnPoolType::kFloat32:
      return 4;
    case LrnPoolType::kFloat64:
      return 8;
    default:
      return 2;
  }
}

// The launch plan for `a`, or nullptr with `why` set when the sizes cannot be run.
inline bool make_plan(const LrnPoolArgs& a, Plan* plan, const char** why) {
  const int elem = element_bytes(a.type);
  const int acc = a.type == LrnPoolType::kFloat64 ? 8 : 4;
  if (a.c < 1 || a.c > kLrnPoolMaxChannels) {
    *why = "lrn_max_pool (CUDA): channels out of range (1 .. kLrnPoolMaxChannels = 2048)";
    return false;
  }
  if (a.size < 1 || a.size > kLrnPoolMaxSize) {
    *why = "lrn_max_pool (CUDA): size out of range (1 .. 64)";
    return false;
  }
  if (a.frames < 1 || a.h < 1 || a.w < 1 || a.ho < 1 || a.wo < 1 || a.kh < 1 || a.kw < 1) {
    *why = "lrn_max_pool (CUDA): sizes must be positive";
    return false;
  }
  Plan p{};
  p.lanes = 16 / elem;
  const bool aligned = (reinterpret_cast<uintptr_t>(a.x) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(a.out) % 16 == 0);
  p.vector = aligned && a.c % p.lanes == 0;
  p.groups = (a.c + p.lanes - 1) / p.lanes;
  p.lo = a.size / 2;
  p.hi = (a.size - 1) / 2;
  p.row = a.c + p.lo + p.hi;
  p.outputs = a.frames * a.ho * a.wo;
  p.positions = p.groups >= kTargetThreads ? 1 : kTargetThreads / p.groups;
  if (p.positions > p.outputs) p.positions = static_cast<int>(p.outputs);
  while (p.positions > 1 && p.positions * p.row * acc > kMaxSmem) --p.positions;
  p.threads = (p.groups * p.positions + 31) / 32 * 32;
  p.smem_bytes = p.positions * p.row * acc;
  p.blocks = (p.outputs + p.positions - 1) / p.positions;
  if (p.threads > kMaxThreads || p.smem_bytes > kMaxSmem) {
    *why = "lrn_max_pool (CUDA): channel vector too large for one block";
    return false;
  }
  if (p.blocks > 0x7fffffffLL) {
    *why = "lrn_max_pool (CUDA): too many output positions for one launch";
    return false;
  }
  *plan = p;
  return true;
}

__host__ __device__ inline float to_acc(float v) { return v; }
__host__ __device__ inline double to_acc(double v) { return v; }
__host__ __device__ inline float to_acc(__half v) { return __half2float(v); }
__host__ __device__ inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __host__ __device__ static float cast(float v) { return v; }
};
template <>
struct FromAcc<double> {
  __host__ __device__ static double cast(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  __host__ __device__ static __half cast(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __host__ __device__ static __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
};

// d^-beta; beta = 0.5 (the paper's) is one reciprocal square root.
__host__ __device__ inline float inv_pow(float d, float beta, bool half_beta) {
#ifdef __CUDA_ARCH__
  return half_beta ? rsqrtf(d) : powf(d, -beta);
#else
  return half_beta ? 1.0f / std::sqrt(d) : std::pow(d, -beta);
#endif
}
__host__ __device__ inline double inv_pow(double d, double beta, bool half_beta) {
#ifdef __CUDA_ARCH__
  return half_beta ? rsqrt(d) : pow(d, -beta);
#else
  return half_beta ? 1.0 / std::sqrt(d) : std::pow(d, -beta);
#endif
}

template <typename Acc>
__host__ __device__ inline Acc nan_max(Acc best, Acc v) {
  return (v > best || v != v) ? v : best;
}

// One thread's work: channels [c0, c0 + L) of output position m.
template <typename T, typename Acc, int L>
struct ThreadState {
  int64_t frame;  // n * T + t
  int i, j;       // output row and column
  int p;          // position within the block (its shared-memory row)
  int c0;
  bool active;    // a real (position, group), not a padding thread or a position past the end
  bool loaded;    // x holds the current window element (inside the frame)
  Acc x[L];
  Acc best[L];
};

template <typename T, typename Acc, int L>
__host__ __device__ inline ThreadState<T, Acc, L> thread_setup(const LrnPoolArgs& a,
                                                               const Plan& plan, int64_t block,
                                                               int tid) {
  ThreadState<T, Acc, L> s;
  s.p = tid / plan.groups;
  s.c0 = (tid % plan.groups) * L;
  const int64_t m = block * plan.positions + s.p;
  s.active = s.p < plan.positions && m < plan.outputs;
  const int64_t mm = s.active ? m : 0;
  s.j = static_cast<int>(mm % a.wo);
  s.i = static_cast<int>((mm / a.wo) % a.ho);
  s.frame = mm / a.wo / a.ho;
  s.loaded = false;
LRN_POOL_UNROLL
  for (int v = 0; v < L; ++v) {
    s.x[v] = Acc(0);
    s.best[v] = -INFINITY;
  }
  return s;
}

// Zero the pads of every row (the channels before 0 and from C on); thread `tid` of `threads`.
template <typename Acc>
__host__ __device__ inline void write_pads(const Plan& plan, int c, int tid, int threads,
                                           Acc* smem) {
  const int pads = plan.lo + plan.hi;
  for (int e = tid; e < plan.positions * pads; e += threads) {
    const int p = e / pads, q = e % pads;
    smem[p * plan.row + (q < plan.lo ? q : c + q)] = Acc(0);
  }
}

// Phase 1 for window element e = dy * kw + dx.
template <typename T, typename Acc, int L, bool kVector>
__host__ __device__ inline void load_element(const LrnPoolArgs& a, const Plan& plan, int e,
                                             ThreadState<T, Acc, L>& s, Acc* smem) {
  const int hh = s.i * a.kh + e / a.kw, ww = s.j * a.kw + e % a.kw;
  s.loaded = s.active && hh < a.h && ww < a.w;
  if (!s.loaded) return;
  const T* px = static_cast<const T*>(a.x) + ((s.frame * a.h + hh) * a.w + ww) * a.c + s.c0;
  Acc* sq = smem + s.p * plan.row + plan.lo + s.c0;
  if (kVector) {
    const uint4 raw = *reinterpret_cast<const uint4*>(px);
    T in[L];
    memcpy(in, &raw, sizeof raw);
LRN_POOL_UNROLL
    for (int v = 0; v < L; ++v) {
      s.x[v] = to_acc(in[v]);
      sq[v] = s.x[v] * s.x[v];
    }
  } else {
LRN_POOL_UNROLL
    for (int v = 0; v < L; ++v) {
      if (s.c0 + v < a.c) {
        s.x[v] = to_acc(px[v]);
        sq[v] = s.x[v] * s.x[v];
      }
    }
  }
}

// Phase 2: the window sum of squares over channels, normalisation, running maximum. Each
// channel sums its own window from shared memory (size <= 64 reads of a row already there): a
// running sum that adds the entering square and subtracts the leaving one would turn an inf
// square into NaN (inf - inf) for every later channel of the group, and cancels digits.
template <typename T, typename Acc, int L>
__host__ __device__ inline void normalize_element(const LrnPoolArgs& a, const Plan& plan,
                                                  ThreadState<T, Acc, L>& s, const Acc* smem) {
  if (!s.loaded) return;
  const Acc* sq = smem + s.p * plan.row + plan.lo + s.c0;  // sq[q]: channel c0 + q
  const Acc alpha_n = static_cast<Acc>(a.alpha_n), k = static_cast<Acc>(a.k);
  const Acc beta = static_cast<Acc>(a.beta);
  const bool half_beta = a.beta == 0.5;
LRN_POOL_UNROLL
  for (int v = 0; v < L; ++v) {
    // Channels past C (a last, partial group) read no further than the row's padding.
    if (s.c0 + v < a.c) {
      Acc sum = 0;
      for (int q = v - plan.lo; q <= v + plan.hi; ++q) sum += sq[q];
      s.best[v] = nan_max(s.best[v], s.x[v] * inv_pow(k + alpha_n * sum, beta, half_beta));
    }
  }
}

// Where the outputs go: the kernel stores directly; the emulator counts the writes.
template <typename T>
struct DirectStore {
  __host__ __device__ void operator()(T* dst, T v) const { *dst = v; }
  __host__ __device__ void vec(uint4* dst, uint4 v) const { *dst = v; }
};

// Phase 3 (after the last window element): one rounding to T and the store.
template <typename T, typename Acc, int L, bool kVector, class Store>
__host__ __device__ inline void store_outputs(const LrnPoolArgs& a,
                                              const ThreadState<T, Acc, L>& s,
                                              const Store& store) {
  if (!s.active) return;
  T* po = static_cast<T*>(a.out) + ((s.frame * a.ho + s.i) * a.wo + s.j) * a.c + s.c0;
  if (kVector) {
    T out[L];
LRN_POOL_UNROLL
    for (int v = 0; v < L; ++v) out[v] = FromAcc<T>::cast(s.best[v]);
    uint4 raw;
    memcpy(&raw, out, sizeof raw);
    store.vec(reinterpret_cast<uint4*>(po), raw);
  } else {
LRN_POOL_UNROLL
    for (int v = 0; v < L; ++v) {
      if (s.c0 + v < a.c) store(po + v, FromAcc<T>::cast(s.best[v]));
    }
  }
}

template <typename T, typename Acc, int L, bool kVector>
__global__ void __launch_bounds__(kMaxThreads) lrn_max_pool_kernel(LrnPoolArgs a, Plan plan) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);
  ThreadState<T, Acc, L> s = thread_setup<T, Acc, L>(a, plan, blockIdx.x, threadIdx.x);
  write_pads(plan, a.c, threadIdx.x, blockDim.x, smem);
  const int elements = a.kh * a.kw;
  for (int e = 0; e < elements; ++e) {
    load_element<T, Acc, L, kVector>(a, plan, e, s, smem);
    __syncthreads();
    normalize_element<T, Acc, L>(a, plan, s, smem);
    __syncthreads();
  }
  store_outputs<T, Acc, L, kVector>(a, s, DirectStore<T>{});
}

template <typename T, typename Acc>
void launch_typed(const LrnPoolArgs& a, const Plan& plan, cudaStream_t stream) {
  constexpr int L = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(plan.blocks)), block(plan.threads);
  if (plan.vector) {
    lrn_max_pool_kernel<T, Acc, L, true><<<grid, block, plan.smem_bytes, stream>>>(a, plan);
  } else {
    lrn_max_pool_kernel<T, Acc, L, false><<<grid, block, plan.smem_bytes, stream>>>(a, plan);
  }
}

}  // namespace lrn_pool

const char* launch_lrn_max_pool(const LrnPoolArgs& args, cudaStream_t stream) {
  lrn_pool::Plan plan;
  const char* why = nullptr;
  if (!lrn_pool::make_plan(args, &plan, &why)) return why;
  switch (args.type) {
    case LrnPoolType::kFloat32:
      lrn_pool::launch_typed<float, float>(args, plan, stream);
      break;
    case LrnPoolType::kFloat16:
      lrn_pool::launch_typed<__half, float>(args, plan, stream);
      break;
    case LrnPoolType::kBFloat16:
      lrn_pool::launch_typed<__nv_bfloat16, float>(args, plan, stream);
      break;
    case LrnPoolType::kFloat64:
      lrn_pool::launch_typed<double, double>(args, plan, stream);
      break;
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace vidconv
