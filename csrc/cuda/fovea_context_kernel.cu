// Fused clip preprocessing on CUDA: uint8 (N, T, H, W, 3) frames in, the normalised fovea and
// context streams (N, 3, T, S, S) out, from one launch and one read of the input.
//
// One block takes one band of output rows of one frame:
//   1. it copies the input rows the band needs into shared memory with 16-byte loads (a row
//      band of a contiguous frame is a run of whole rows, so consecutive threads read
//      consecutive 16-byte chunks: coalesced and vectorised whatever the row alignment; for the
//      paper's 178x178x3 frames a row is 534 bytes, 2-byte aligned, which rules out reading
//      pixels straight as wide words);
//   2. it writes the band's fovea rows and context rows from shared memory. A band's rows are
//      one run of memory per channel (planar) or one run for all three (channels_last); each
//      thread computes whole 16-byte chunks of a run (8 half / bfloat16 or 4 float values) and
//      stores each with one 16-byte store, consecutive threads on consecutive chunks; only the
//      elements before a run's first 16-byte boundary and after its last go one by one. Row,
//      column and channel are found once per chunk and stepped from there. (The general area
//      context path, whose values each loop over a bin, stores element by element: unrolled
//      chunks of it spilled registers.)
// The fovea is a sub-rectangle of the same rows, so each input byte leaves DRAM once.
// With H = W = 2S (the paper's 178 -> 89) a context pixel is the mean of a 2x2 block and has a
// path without bin tables. Frames too large for a band of rows in shared memory take a direct
// path (same arithmetic, global loads).
//
// Arithmetic matches the CPU kernel bit for bit: exact integer bin sums, then
// float(sum) * (1/count), (x - mean) * (1/std), each op rounded once (no FMA contraction),
// then one round-to-nearest-even conversion to the output type.
//
// The phases are __host__ __device__ functions of (block, thread), and the stores go through a
// policy, so tools/emulate_fovea_context.cu steps this code on the host (counting every write)
// to check staging, indexing and alignment without a GPU.
#include "cuda/fovea_context_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace vidconv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Shared memory a staged block aims for (pixels + tables): 8 blocks of 256 threads per SM fit
// within an H100's 228 KB, enough loads in flight to stream at full bandwidth.
constexpr int kSmemTarget = 24 * 1024;
// Hard cap: the default dynamic shared memory limit, no opt-in attribute needed.
constexpr int kSmemMax = 48 * 1024;
// Output elements per block on the direct path.
constexpr int kDirectElements = 8192;

enum class Variant : int { kHalve, kArea, kDirect };

struct Plan {
  int rows_per_band;  // output rows per block (B)
  int bands;          // blocks per frame, ceil(S / B)
  int pitch;          // bytes per staged input row (multiple of 16)
  int max_rows;       // staged input rows per block, upper bound
  int table_offset;   // byte offset of the bin tables in shared memory
  int smem;           // dynamic shared memory bytes
  Variant variant;
};

// q / d and q % d for 0 <= q < 2^22 without integer division: (q + 0.5) / d is at least 0.5 / d
// away from an integer, which the float product's relative error 2^-23 cannot cross there.
struct DivMod {
  int quot, rem;
};
__host__ __device__ inline DivMod divmod(int q, int d, float inv_d) {
  const int quot = static_cast<int>((static_cast<float>(q) + 0.5f) * inv_d);
  return {quot, q - quot * d};
}

// adaptive_avg_pool2d's bins: output i of s covers input [floor(i*n/s), ceil((i+1)*n/s)).
__host__ __device__ inline int bin_start(int i, int n, int s) { return (i * n) / s; }
__host__ __device__ inline int bin_end(int i, int n, int s) { return ((i + 1) * n + s - 1) / s; }

__host__ __device__ inline float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ inline float fsub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
__host__ __device__ inline float u2f(uint32_t v) {
#ifdef __CUDA_ARCH__
  return __uint2float_rn(v);
#else
  return static_cast<float>(v);
#endif
}
__host__ __device__ inline float recip(float v) {
#ifdef __CUDA_ARCH__
  return __frcp_rn(v);
#else
  return 1.0f / v;
#endif
}

__host__ __device__ inline uint4 load16(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const uint4*>(p));
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}
__host__ __device__ inline uint8_t load1(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Channel c's entry of a 3-array in kernel parameters: a dynamic index would copy the
// parameters to local memory.
__host__ __device__ inline float pick(const float (&v)[3], int c) {
  return c == 0 ? v[0] : (c == 1 ? v[1] : v[2]);
}

template <typename T>
__host__ __device__ inline T convert(float v);
template <>
__host__ __device__ inline float convert<float>(float v) {
  return v;
}
template <>
__host__ __device__ inline __half convert<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ inline __nv_bfloat16 convert<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Where one block works: its clip, frame, rows, and the input rows it reads.
struct Band {
  int64_t n;
  const uint8_t* frame;
  int64_t out_base;  // offset of (n, 0, t, 0, 0) in the outputs
  int oy, ox;
  bool flip;
  int i0, i1;        // context output rows [i0, i1) (crop: unused)
  int f0, f1;        // fovea output rows [f0, f1)
  int y_lo, y_hi;    // input rows read [y_lo, y_hi)
  int bx0, bx1;      // bytes of each input row read [bx0, bx1)
};

__host__ __device__ inline Band make_band(const PreprocessArgs& a, const Plan& p, int64_t block) {
  const int S = a.size, H = a.h, W = a.w;
  const int64_t frame = block / p.bands;
  const int band = static_cast<int>(block - frame * p.bands);
  Band b;
  b.n = frame / a.t;
  const int64_t t = frame - b.n * a.t;
  b.frame = a.clips + frame * (static_cast<int64_t>(H) * W * 3);
  b.out_base = b.n * 3 * a.t * S * S + t * (a.channels_last ? 3LL * S * S : 1LL * S * S);
  // Validated by the caller; clamped so that no offset can ever read outside the frame.
  b.oy = static_cast<int>(min(max(a.offsets[2 * b.n], int64_t{0}), int64_t{H - S}));
  b.ox = static_cast<int>(min(max(a.offsets[2 * b.n + 1], int64_t{0}), int64_t{W - S}));
  b.flip = a.flip[b.n];
  const int r0 = band * p.rows_per_band;
  const int r1 = min(r0 + p.rows_per_band, S);
  if (a.context != nullptr) {
    // Context rows [r0, r1) read input rows [y_lo, y_hi); this band owns (writes the fovea
    // rows of) input rows [start(r0), start(r1)), a partition of the frame's rows.
    b.i0 = r0;
    b.i1 = r1;
    b.y_lo = bin_start(r0, H, S);
    b.y_hi = bin_end(r1 - 1, H, S);
    const int own_hi = r1 == S ? H : bin_start(r1, H, S);
    b.f0 = max(b.y_lo - b.oy, 0);
    b.f1 = min(own_hi - b.oy, S);
    b.bx0 = 0;
    b.bx1 = 3 * W;
  } else {
    b.i0 = b.i1 = 0;
    b.f0 = r0;
    b.f1 = r1;
    b.y_lo = b.oy + r0;
    b.y_hi = b.oy + r1;
    b.bx0 = 3 * b.ox;
    b.bx1 = 3 * (b.ox + S);
  }
  return b;
}

// Input row y from byte bx0 on: in shared memory (staged) or global memory (direct).
template <bool kStaged>
__host__ __device__ inline const uint8_t* row_ptr(const Band& b, const Plan& p, const uint8_t* smem,
                                                  const PreprocessArgs& a, int y) {
  const uint8_t* g = b.frame + static_cast<int64_t>(y) * a.w * 3 + b.bx0;
  if (!kStaged) {
    return g;
  }
  return smem + (y - b.y_lo) * p.pitch + (reinterpret_cast<uintptr_t>(g) & 15);
}

// Phase 1: stage the band's input rows, 16 bytes per load; chunks that stick out of the clips
// tensor (only possible at its very ends) are read byte by byte within it. Also fills the bin
// tables of the general area path.
template <Variant kVariant>
__host__ __device__ void load_phase(const PreprocessArgs& a, const Plan& p, const Band& b,
                                    uint8_t* smem, int tid, int nthreads) {
  if (kVariant != Variant::kDirect) {
    const int chunks = p.pitch / 16;
    const float inv_chunks = 1.0f / static_cast<float>(chunks);
    const int total = (b.y_hi - b.y_lo) * chunks;
    const uint8_t* begin = a.clips;
    const uint8_t* end = a.clips + a.n * a.t * a.h * static_cast<int64_t>(a.w) * 3;
    const int row_bytes = b.bx1 - b.bx0;
    for (int k = tid; k < total; k += nthreads) {
      const DivMod rc = divmod(k, chunks, inv_chunks);
      const uint8_t* row = b.frame + static_cast<int64_t>(b.y_lo + rc.quot) * a.w * 3 + b.bx0;
      const uint8_t* chunk =
          reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(row) & ~uintptr_t{15}) +
          16 * rc.rem;
      if (chunk >= row + row_bytes) {
        continue;  // this row's window needs one chunk fewer
      }
      uint4 v;
      if (chunk >= begin && chunk + 16 <= end) {
        v = load16(chunk);
      } else {
        uint8_t bytes[16];
        for (int i = 0; i < 16; ++i) {
          bytes[i] = (chunk + i >= begin && chunk + i < end) ? load1(chunk + i) : uint8_t{0};
        }
        v = *reinterpret_cast<const uint4*>(bytes);
      }
      *reinterpret_cast<uint4*>(smem + rc.quot * p.pitch + 16 * rc.rem) = v;
    }
  }
  if (kVariant != Variant::kHalve && a.context != nullptr) {
    int* xb = reinterpret_cast<int*>(smem + p.table_offset);  // [x0 | x1] per output column
    int* yb = xb + 2 * a.size;                                 // [y0 | y1] per band row
    const int S = a.size;
    for (int j = tid; j < S; j += nthreads) {
      xb[j] = bin_start(j, a.w, S);
      xb[S + j] = bin_end(j, a.w, S);
    }
    const int rows = b.i1 - b.i0;
    for (int r = tid; r < rows; r += nthreads) {
      yb[r] = bin_start(b.i0 + r, a.h, S);
      yb[rows + r] = bin_end(b.i0 + r, a.h, S);
    }
  }
}

// The bits of one output value (float, half or bfloat16), as the low bytes of a 32-bit word.
template <typename T>
__host__ __device__ inline uint32_t value_bits(T v) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16- or 32-bit outputs");
  if constexpr (sizeof(T) == 4) {
    uint32_t w;
    memcpy(&w, &v, 4);
    return w;
  } else {
    uint16_t h;
    memcpy(&h, &v, 2);
    return h;
  }
}

// Where element k of a run of output rows stands: row r, column j, channel c. A planar run is
// one channel's rows (k = r * S + j), a channels_last run all three (k = (r * S + j) * 3 + c).
// Found once per 16-byte chunk (integer division: exact for any run length), then stepped
// element by element.
template <bool kChannelsLast>
struct Cursor {
  int r, j, c;
  __host__ __device__ Cursor(int k, int S, int channel) {
    if (kChannelsLast) {
      r = k / (3 * S);
      const int rem = k - r * 3 * S;
      j = rem / 3;
      c = rem - 3 * j;
    } else {
      r = k / S;
      j = k - r * S;
      c = channel;
    }
  }
  __host__ __device__ void next(int S) {
    if (kChannelsLast && ++c < 3) {
      return;
    }
    c = kChannelsLast ? 0 : c;
    if (++j == S) {
      j = 0;
      ++r;
    }
  }
};

// Plain global stores; the host emulation passes one that also counts every write.
struct GlobalStore {
  template <typename T>
  __host__ __device__ void one(T* dst, T v) const {
    *dst = v;
  }
  __host__ __device__ void vec(uint4* dst, uint4 v) const { *dst = v; }
};

// Writes `rows` output rows of S pixels starting at `dst` (the row r0 of one frame's output):
// value(r, j, c) for row r0 + r, column j, channel c. With kVector each thread writes whole
// 16-byte chunks (8 half / bfloat16 or 4 float values, consecutive threads on consecutive
// chunks), and the elements before a run's first 16-byte boundary and after its last one by
// one; without, every element one by one (for values that loop over many input pixels, whose
// unrolled chunk would spill registers).
template <typename out_t, bool kChannelsLast, bool kVector, typename Value, typename Store>
__host__ __device__ void store_rows(out_t* dst, int rows, int S, int64_t plane,
                                    const Value& value, const Store& store, int tid,
                                    int nthreads) {
  constexpr int kVec = kVector ? 16 / static_cast<int>(sizeof(out_t)) : 1;
  const int len = kChannelsLast ? 3 * rows * S : rows * S;
  for (int channel = 0; channel < (kChannelsLast ? 1 : 3); ++channel) {
    out_t* run = dst + (kChannelsLast ? 0 : channel * plane);
    const int misaligned =
        static_cast<int>((reinterpret_cast<uintptr_t>(run) / sizeof(out_t)) % kVec);
    const int head = min(misaligned == 0 ? 0 : kVec - misaligned, len);
    const int chunks = kVector ? (len - head) / kVec : 0;
    const int tail = head + chunks * kVec;
    for (int q = tid; q < chunks; q += nthreads) {
      const int k = head + q * kVec;
      Cursor<kChannelsLast> at(k, S, channel);
      uint32_t words[4] = {0, 0, 0, 0};
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
      for (int e = 0; e < kVec; ++e) {
        const uint32_t bits = value_bits(convert<out_t>(value(at.r, at.j, at.c)));
        words[e * sizeof(out_t) / 4] |= bits << (8 * ((e * sizeof(out_t)) % 4));
        at.next(S);
      }
      store.vec(reinterpret_cast<uint4*>(run + k), make_uint4(words[0], words[1], words[2],
                                                              words[3]));
    }
    for (int q = tid; q < head + (len - tail); q += nthreads) {
      const int k = q < head ? q : tail + (q - head);
      const Cursor<kChannelsLast> at(k, S, channel);
      store.one(run + k, convert<out_t>(value(at.r, at.j, at.c)));
    }
  }
}

// Phase 2: write the band's fovea rows, then its context rows.
template <typename out_t, bool kChannelsLast, Variant kVariant, typename Store = GlobalStore>
__host__ __device__ void store_phase(const PreprocessArgs& a, const Plan& p, const Band& b,
                                     const uint8_t* smem, int tid, int nthreads,
                                     const Store& store = Store{}) {
  constexpr bool kStaged = kVariant != Variant::kDirect;
  const int S = a.size;
  const int64_t plane = static_cast<int64_t>(a.t) * S * S;  // channel stride, contiguous
  const int64_t row_stride = kChannelsLast ? 3LL * S : S;

  const int f_rows = b.f1 - b.f0;
  if (f_rows > 0) {
    auto fovea_value = [&](int r, int j, int c) {
      const int sj = b.flip ? S - 1 - j : j;
      const uint8_t* row = row_ptr<kStaged>(b, p, smem, a, b.oy + b.f0 + r);
      const uint8_t v = row[3 * (b.ox + sj) + c - b.bx0];
      return fmul(fsub(u2f(v), pick(a.mean, c)), pick(a.inv_std, c));
    };
    store_rows<out_t, kChannelsLast, true>(
        static_cast<out_t*>(a.fovea) + b.out_base + b.f0 * row_stride, f_rows, S, plane,
        fovea_value, store, tid, nthreads);
  }
  if (a.context == nullptr) {
    return;
  }

  const int c_rows = b.i1 - b.i0;
  const int* xb = reinterpret_cast<const int*>(smem + p.table_offset);
  const int* yb = xb + 2 * S;
  auto context_value = [&](int r, int j, int c) {
    const int sj = b.flip ? S - 1 - j : j;
    float mean_value;
    if (kVariant == Variant::kHalve) {
      const int y = 2 * (b.i0 + r);
      const uint8_t* top = row_ptr<kStaged>(b, p, smem, a, y) + 6 * sj + c;
      const uint8_t* bottom = row_ptr<kStaged>(b, p, smem, a, y + 1) + 6 * sj + c;
      const uint32_t sum = top[0] + top[3] + bottom[0] + bottom[3];
      mean_value = fmul(u2f(sum), 0.25f);
    } else {
      const int y0 = yb[r], y1 = yb[c_rows + r];
      const int x0 = xb[sj], x1 = xb[S + sj];
      uint32_t sum = 0;
      for (int y = y0; y < y1; ++y) {
        const uint8_t* row = row_ptr<kStaged>(b, p, smem, a, y) + c;
        for (int x = x0; x < x1; ++x) {
          sum += row[3 * x];
        }
      }
      const uint32_t count = static_cast<uint32_t>((y1 - y0) * (x1 - x0));
      mean_value = fmul(u2f(sum), recip(u2f(count)));
    }
    return fmul(fsub(mean_value, pick(a.mean, c)), pick(a.inv_std, c));
  };
  store_rows<out_t, kChannelsLast, kVariant == Variant::kHalve>(
      static_cast<out_t*>(a.context) + b.out_base + b.i0 * row_stride, c_rows, S, plane,
      context_value, store, tid, nthreads);
}

template <typename out_t, bool kChannelsLast, Variant kVariant>
__global__ void __launch_bounds__(kThreads)
    fovea_context_kernel(const PreprocessArgs args, const Plan plan) {
  extern __shared__ uint4 smem_words[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem_words);
  const Band band = make_band(args, plan, blockIdx.x);
  load_phase<kVariant>(args, plan, band, smem, threadIdx.x, blockDim.x);
  __syncthreads();
  store_phase<out_t, kChannelsLast, kVariant>(args, plan, band, smem, threadIdx.x, blockDim.x);
}

Plan make_plan(const PreprocessArgs& a) {
  const int S = a.size, H = a.h, W = a.w;
  const bool ctx = a.context != nullptr;
  const int row_bytes = ctx ? 3 * W : 3 * S;
  Plan p{};
  p.pitch = 16 * ((row_bytes + 15) / 16 + 1);  // room for any 16-byte misalignment of a row
  // Input rows a band of `rows` output rows reads: ceil(rows*H/S) + 1 covers any bin phase.
  auto max_rows = [&](int rows) {
    return ctx ? static_cast<int>((static_cast<int64_t>(rows) * H + S - 1) / S) + 1 : rows;
  };
  auto tables = [&](int rows) { return ctx ? 8 * S + 8 * rows : 0; };
  auto smem = [&](int rows) { return max_rows(rows) * p.pitch + tables(rows); };
  const bool halve = ctx && H == 2 * S && W == 2 * S;

  int rows = 0;
  for (int budget : {kSmemTarget, kSmemMax}) {
    // smem(rows) grows with rows: the largest fit under the budget, by bisection.
    int lo = 0, hi = S;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (smem(mid) <= budget) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    if (lo > 0) {
      rows = lo;
      break;
    }
  }
  if (rows > 0) {
    p.variant = halve ? Variant::kHalve : Variant::kArea;
  } else {
    p.variant = Variant::kDirect;
    rows = std::max(1, std::min(S, kDirectElements / (3 * S)));
  }
  // Even bands: ceil(S / rows) blocks per frame, rows spread over them.
  p.bands = (S + rows - 1) / rows;
  p.rows_per_band = (S + p.bands - 1) / p.bands;
  p.max_rows = p.variant == Variant::kDirect ? 0 : max_rows(p.rows_per_band);
  p.table_offset = p.max_rows * p.pitch;
  p.smem = p.table_offset + (p.variant == Variant::kHalve ? 0 : tables(p.rows_per_band));
  return p;
}

template <typename out_t, bool kChannelsLast>
void launch_typed(const PreprocessArgs& a, const Plan& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(a.n * a.t * p.bands);
  switch (p.variant) {
    case Variant::kHalve:
      fovea_context_kernel<out_t, kChannelsLast, Variant::kHalve>
          <<<blocks, kThreads, p.smem, stream>>>(a, p);
      break;
    case Variant::kArea:
      fovea_context_kernel<out_t, kChannelsLast, Variant::kArea>
          <<<blocks, kThreads, p.smem, stream>>>(a, p);
      break;
    case Variant::kDirect:
      fovea_context_kernel<out_t, kChannelsLast, Variant::kDirect>
          <<<blocks, kThreads, p.smem, stream>>>(a, p);
      break;
  }
}

template <typename out_t>
void launch_layout(const PreprocessArgs& a, const Plan& p, cudaStream_t stream) {
  if (a.channels_last) {
    launch_typed<out_t, true>(a, p, stream);
  } else {
    launch_typed<out_t, false>(a, p, stream);
  }
}

}  // namespace

void launch_fovea_context(const PreprocessArgs& args, cudaStream_t stream) {
  const Plan plan = make_plan(args);
  switch (args.out_type) {
    case OutType::kFloat32:
      launch_layout<float>(args, plan, stream);
      break;
    case OutType::kFloat16:
      launch_layout<__half>(args, plan, stream);
      break;
    case OutType::kBFloat16:
      launch_layout<__nv_bfloat16>(args, plan, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace vidconv
