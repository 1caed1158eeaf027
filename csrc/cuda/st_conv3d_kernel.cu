// Fused spatio-temporal convolution as an implicit GEMM, CUDA runtime only (no torch headers).
//
//   out[m, k] = act(bias[k] + sum_r A[m, r] * W[k, r])
//   m = (n, t', h', w')  over N*T'*H'*W' output positions (the GEMM's M)
//   k                    over the K filters (the GEMM's N)
//   r = (dt, dy, dx, c)  over kt*kh*kw*C (the reduction), the order of the repacked weight
//
// A is never materialised: each thread gathers 16-byte vectors of 8 (16-bit) or 4 (fp32)
// channels straight from the NTHWC input with cp.async, zero-filling taps that fall in the
// padding or past the tile edge. Because C is a multiple of the vector width, one vector never
// straddles two taps and every source address is 16-byte aligned. Tiles go through a 3-stage
// cp.async pipeline in shared memory; 16-bit types multiply on tensor cores with
// mma.sync.m16n8k16 (fp32 accumulation) fed by ldmatrix, fp32 with plain FFMA. The epilogue adds
// the bias, applies ReLU, casts and writes each output element once, in NTHWK order (which is
// (N, K, T', H', W') in channels_last_3d memory).
//
// The per-thread pieces (tile loader, fp32 FFMA step, ldmatrix lane addresses, both epilogues)
// are __host__ __device__ so tools/emulate_st_conv.py can step every block and thread of a
// launch on the CPU (cp.async becomes a synchronous copy there; ldmatrix and mma.sync, which are
// warp-collective, are modelled by the emulator from the PTX ISA's fragment layouts).
#include "cuda/st_conv3d_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstring>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "st_conv3d_kernel.cu needs sm_80 or newer (cp.async, bf16 mma.sync)"
#endif

namespace vidconv {
namespace cuda {
namespace {

constexpr int kStages = 3;

// `#pragma unroll` in a __host__ __device__ function trips the host compiler's
// -Wunknown-pragmas; only the device pass gets it.
#ifdef __CUDA_ARCH__
#define ST_UNROLL _Pragma("unroll")
#else
#define ST_UNROLL
#endif

// ---- PTX wrappers -------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes = 0 writes 16 zero bytes (padding, edges).
// On the host (emulation only) the same copy happens synchronously.
__host__ __device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef __CUDA_ARCH__
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_bytes)
               : "memory");
#else
  if (valid) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Output position tile and filter tile of a block. Consecutive blocks share a position tile
// (all filter tiles of it), so its input gathers are L2 hits for all but the first.
struct BlockTile {
  int m0, n0;
};
__host__ __device__ __forceinline__ BlockTile block_tile(int block, int tiles_n, int bm, int bn) {
  return {(block / tiles_n) * bm, (block % tiles_n) * bn};
}

// ---- shared tile loader ---------------------------------------------------------------------
//
// Each thread owns one 16-byte column (vector) of the BK-wide tile and the rows
// row0, row0 + kRowStep, ... of the A (BM rows) and B (BN rows) tiles. The output-position decode
// of its A rows is done once per block; per k tile only the reduction vector is decoded (shared
// by all of the thread's rows).
template <typename T, int BM, int BN, int BK, int kThreads>
struct TileLoader {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  static constexpr int kVecPerRow = BK / kVec;
  static constexpr int kRowStep = kThreads / kVecPerRow;
  static constexpr int kARows = BM / kRowStep;
  static constexpr int kBRows = BN / kRowStep;
  static constexpr int kLd = BK + kVec;  // shared row pitch: 16 bytes of skew against conflicts
  static_assert(BK % kVec == 0 && kThreads % kVecPerRow == 0, "tile/thread mismatch");
  static_assert(BM % kRowStep == 0 && BN % kRowStep == 0, "tile/thread mismatch");

  const T* x;
  const T* w;
  long long a_base[kARows];  // element offset of the row's image (n * T*H*W*C)
  int a_t0[kARows], a_h0[kARows], a_w0[kARows];  // first input (t, h, w) of the row's window
  int b_row_off[kBRows];                          // filter row offset, -1 past K
  int vec_col, row0;
  int cv_count, n_vec;  // vectors per tap (C / kVec), vectors in the reduction
  int kw, kh, c, t, h, wd;

  __host__ __device__ __forceinline__ TileLoader(const StConvArgs& p, int m0, int n0, int tid)
      : x(static_cast<const T*>(p.input)), w(static_cast<const T*>(p.weight)) {
    vec_col = tid % kVecPerRow;
    row0 = tid / kVecPerRow;
    cv_count = p.c / kVec;
    n_vec = p.kt * p.kh * p.kw * cv_count;
    kw = p.kw;
    kh = p.kh;
    c = p.c;
    t = p.t;
    h = p.h;
    wd = p.w;
    const int m_total = p.n * p.to * p.ho * p.wo;
ST_UNROLL
    for (int i = 0; i < kARows; ++i) {
      const int m = m0 + row0 + i * kRowStep;
      if (m < m_total) {
        int r = m;
        const int ow = r % p.wo;
        r /= p.wo;
        const int oh = r % p.ho;
        r /= p.ho;
        const int ot = r % p.to;
        const int n = r / p.to;
        a_base[i] = static_cast<long long>(n) * p.t * p.h * p.w * p.c;
        a_t0[i] = ot * p.st - p.pt;
        a_h0[i] = oh * p.sh - p.ph;
        a_w0[i] = ow * p.sw - p.pw;
      } else {
        // Rows past M read nothing: a start this far out fails every bounds check.
        a_base[i] = 0;
        a_t0[i] = INT_MIN / 2;
        a_h0[i] = 0;
        a_w0[i] = 0;
      }
    }
ST_UNROLL
    for (int i = 0; i < kBRows; ++i) {
      const int kf = n0 + row0 + i * kRowStep;
      b_row_off[i] = kf < p.k ? kf : -1;
    }
  }

  // Reduction tiles of the launch (the last one ragged, zero-filled past the end).
  __host__ __device__ __forceinline__ int k_tiles() const {
    return (n_vec + kVecPerRow - 1) / kVecPerRow;
  }

  // Issues the cp.asyncs of reduction tile `tile` into As/Bs (row pitch kLd).
  __host__ __device__ __forceinline__ void load(int tile, T* As, T* Bs) const {
    const int gv = tile * kVecPerRow + vec_col;
    const bool in_k = gv < n_vec;
    // Reduction vector -> (dt, dy, dx, channel offset).
    const int cv = gv % cv_count;
    int tap = gv / cv_count;
    const int dx = tap % kw;
    tap /= kw;
    const int dy = tap % kh;
    const int dt = tap / kh;
    const int col = vec_col * kVec;
ST_UNROLL
    for (int i = 0; i < kARows; ++i) {
      const int ti = a_t0[i] + dt;
      const int hi = a_h0[i] + dy;
      const int wi = a_w0[i] + dx;
      const bool ok = in_k && static_cast<unsigned>(ti) < static_cast<unsigned>(t) &&
                      static_cast<unsigned>(hi) < static_cast<unsigned>(h) &&
                      static_cast<unsigned>(wi) < static_cast<unsigned>(wd);
      const T* src = ok ? x + a_base[i] + (static_cast<long long>((ti * h + hi) * wd + wi) * c +
                                           cv * kVec)
                        : x;
      cp_async16(As + (row0 + i * kRowStep) * kLd + col, src, ok);
    }
ST_UNROLL
    for (int i = 0; i < kBRows; ++i) {
      const bool ok = in_k && b_row_off[i] >= 0;
      const T* src =
          ok ? w + static_cast<long long>(b_row_off[i]) * n_vec * kVec + gv * kVec : w;
      cp_async16(Bs + (row0 + i * kRowStep) * kLd + col, src, ok);
    }
  }
};

// ---- tensor-core kernel (float16 / bfloat16) --------------------------------------------------
//
// Block tile BM (positions) x BN (filters) x 32 (reduction), 4 warps as 2 x 2, warp tile
// BM/2 x BN/2: per 16-wide reduction step a warp issues BM/32 ldmatrix.x4 for A, BN/32 for B and
// (BM/32) * (BN/16) mma.m16n8k16. Which tile is fastest depends on the layer (a small layer wants
// small tiles to fill the SMs, a large one big tiles for reuse), so every one below is compiled
// and the op measures them on the user's device (vidconv/ops/conv_planner.py).
constexpr int kMmaBK = 32, kMmaThreads = 128;
constexpr int kMmaLd = kMmaBK + 8;  // TileLoader's pitch for 16-bit types

template <int BM_, int BN_>
struct MmaTile {
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int kWarpM = BM / 2, kWarpN = BN / 2;
  static constexpr int kMI = kWarpM / 16;  // m16 fragments per warp
  static constexpr int kNJ = kWarpN / 8;   // n8 fragments per warp (kNJ / 2 ldmatrix.x4 for B)
  static_assert(BM % 32 == 0 && BN % 32 == 0, "a warp tile is a whole number of x4 loads");
};

// Shared-memory element offset (within one stage) of the row `lane` hands to ldmatrix.x4 for A
// fragment i (rows i*16..+15 of the warp tile) at reduction step kk. Lanes 0-15 give rows 0-15
// at column kk, lanes 16-31 the same rows at kk+8: matrices 0-3 are then a0-a3 of m16n8k16.
template <class Tile>
__host__ __device__ __forceinline__ int mma_a_offset(int warp, int lane, int i, int kk) {
  const int row = (warp >> 1) * Tile::kWarpM + i * 16 + (lane & 15);
  return row * kMmaLd + kk + (lane >> 4) * 8;
}

// Same for B pair j (filters j*16..+15 of the warp tile): lanes 0-7 filters 0-7 at kk, 8-15
// filters 0-7 at kk+8, 16-23 filters 8-15 at kk, 24-31 filters 8-15 at kk+8, so registers 0,1
// are b0,b1 of the n8 tile 2j and registers 2,3 those of n8 tile 2j+1.
template <class Tile>
__host__ __device__ __forceinline__ int mma_b_offset(int warp, int lane, int j, int kk) {
  const int row = (warp & 1) * Tile::kWarpN + j * 16 + (lane & 7) + ((lane >> 4) << 3);
  return row * kMmaLd + kk + ((lane >> 3) & 1) * 8;
}

// Writes two adjacent 16-bit outputs of one row: one 32-bit store when K is even (the pair is
// then aligned), else one or two 16-bit stores.
template <typename T>
struct PairStore {
  T* out;
  int k;
  __host__ __device__ __forceinline__ void operator()(int m, int col, float v0, float v1,
                                                      bool has1) const {
    T* dst = out + static_cast<long long>(m) * k + col;
    if ((k & 1) == 0) {
      using P = typename Pair<T>::type;
      *reinterpret_cast<P*>(dst) = P(from_float<T>(v0), from_float<T>(v1));
    } else {
      dst[0] = from_float<T>(v0);
      if (has1) {
        dst[1] = from_float<T>(v1);
      }
    }
  }
};

// Bias, ReLU and the store of one warp's accumulator tile. m16n8 accumulator layout:
// e0, e1 at (row g, cols 2q, 2q+1), e2, e3 at row g+8 (g = lane / 4, q = lane % 4).
template <class Tile, class Store>
__host__ __device__ __forceinline__ void mma_epilogue(
    const StConvArgs& p, int m0, int n0, int warp, int lane,
    const float (&acc)[Tile::kMI][Tile::kNJ][4], const Store& store) {
  const int m_total = p.n * p.to * p.ho * p.wo;
  const int g = lane >> 2;
  const int q = lane & 3;
ST_UNROLL
  for (int j = 0; j < Tile::kNJ; ++j) {
    const int col = n0 + (warp & 1) * Tile::kWarpN + j * 8 + 2 * q;
    if (col >= p.k) {
      continue;
    }
    const bool has1 = col + 1 < p.k;
    const float bias0 = p.bias ? p.bias[col] : 0.f;
    const float bias1 = (p.bias && has1) ? p.bias[col + 1] : 0.f;
ST_UNROLL
    for (int i = 0; i < Tile::kMI; ++i) {
ST_UNROLL
      for (int half = 0; half < 2; ++half) {
        const int m = m0 + (warp >> 1) * Tile::kWarpM + i * 16 + g + half * 8;
        if (m < m_total) {
          float v0 = acc[i][j][2 * half] + bias0;
          float v1 = acc[i][j][2 * half + 1] + bias1;
          if (p.relu) {
            v0 = fmaxf(v0, 0.f);
            v1 = fmaxf(v1, 0.f);
          }
          store(m, col, v0, v1, has1);
        }
      }
    }
  }
}

template <typename T, class Tile>
__global__ void __launch_bounds__(kMmaThreads)
    st_conv3d_mma_kernel(const StConvArgs p, int tiles_n) {
  using Loader = TileLoader<T, Tile::BM, Tile::BN, kMmaBK, kMmaThreads>;
  static_assert(Loader::kLd == kMmaLd, "ldmatrix offsets assume the loader's pitch");
  constexpr int kMI = Tile::kMI, kNJ = Tile::kNJ;
  __shared__ __align__(128) T As[kStages][Tile::BM * kMmaLd];
  __shared__ __align__(128) T Bs[kStages][Tile::BN * kMmaLd];

  const BlockTile bt = block_tile(static_cast<int>(blockIdx.x), tiles_n, Tile::BM, Tile::BN);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;

  const Loader loader(p, bt.m0, bt.n0, tid);
  const int k_tiles = loader.k_tiles();

  float acc[kMI][kNJ][4];
ST_UNROLL
  for (int i = 0; i < kMI; ++i) {
ST_UNROLL
    for (int j = 0; j < kNJ; ++j) {
ST_UNROLL
      for (int e = 0; e < 4; ++e) {
        acc[i][j][e] = 0.f;
      }
    }
  }

ST_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) {
      loader.load(s, As[s], Bs[s]);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    // Groups committed so far: kStages - 1 + kt; leaving kStages - 2 in flight means tile kt's
    // has landed (for this thread; the barrier makes it so for all).
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt visible to all; stage (kt - 1) % kStages free to overwrite
    const int next = kt + kStages - 1;
    if (next < k_tiles) {
      loader.load(next, As[next % kStages], Bs[next % kStages]);
    }
    cp_async_commit();  // possibly empty: keeps the group count above exact

    const T* a_s = As[kt % kStages];
    const T* b_s = Bs[kt % kStages];
ST_UNROLL
    for (int kk = 0; kk < kMmaBK; kk += 16) {
      unsigned a[kMI][4];
      unsigned b[kNJ / 2][4];
ST_UNROLL
      for (int i = 0; i < kMI; ++i) {
        ldmatrix_x4(a[i], a_s + mma_a_offset<Tile>(warp, lane, i, kk));
      }
ST_UNROLL
      for (int j = 0; j < kNJ / 2; ++j) {
        ldmatrix_x4(b[j], b_s + mma_b_offset<Tile>(warp, lane, j, kk));
      }
ST_UNROLL
      for (int i = 0; i < kMI; ++i) {
ST_UNROLL
        for (int j = 0; j < kNJ; ++j) {
          Mma<T>::run(acc[i][j], a[i], b[j >> 1][(j & 1) * 2], b[j >> 1][(j & 1) * 2 + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  mma_epilogue<Tile>(p, bt.m0, bt.n0, warp, lane, acc,
                     PairStore<T>{static_cast<T*>(p.out), p.k});
}

// ---- fp32 kernel (FFMA) -----------------------------------------------------------------------
//
// Block tile BM x BN x 16, 256 threads as 16 x 16, each computing BM/16 x BN/16 outputs at rows
// ty + 16 i and filters tx + 16 j (strided, so a warp's filter reads fall in distinct banks and
// its stores are contiguous along K).
constexpr int kF32BK = 16, kF32Threads = 256;
constexpr int kF32Ld = kF32BK + 4;  // TileLoader's pitch for float

template <int BM_, int BN_>
struct F32Tile {
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int kMI = BM / 16, kNJ = BN / 16;  // outputs per thread, rows x filters
  static_assert(BM % 64 == 0 && BN % 64 == 0, "the loader moves 64 rows per pass");
};

// One thread's outer products over one BK-wide stage, in a fixed order (FFMA along the
// reduction, 4 channels at a time), so the host emulation reproduces the device bit for bit.
template <class Tile>
__host__ __device__ __forceinline__ void f32_stage(const float* a_s, const float* b_s, int tx,
                                                   int ty,
                                                   float (&acc)[Tile::kMI][Tile::kNJ]) {
ST_UNROLL
  for (int k4 = 0; k4 < kF32BK; k4 += 4) {
    float4 a[Tile::kMI], b[Tile::kNJ];
ST_UNROLL
    for (int i = 0; i < Tile::kMI; ++i) {
      a[i] = *reinterpret_cast<const float4*>(a_s + (ty + 16 * i) * kF32Ld + k4);
    }
ST_UNROLL
    for (int j = 0; j < Tile::kNJ; ++j) {
      b[j] = *reinterpret_cast<const float4*>(b_s + (tx + 16 * j) * kF32Ld + k4);
    }
ST_UNROLL
    for (int i = 0; i < Tile::kMI; ++i) {
ST_UNROLL
      for (int j = 0; j < Tile::kNJ; ++j) {
        acc[i][j] = fmaf(a[i].x, b[j].x, acc[i][j]);
        acc[i][j] = fmaf(a[i].y, b[j].y, acc[i][j]);
        acc[i][j] = fmaf(a[i].z, b[j].z, acc[i][j]);
        acc[i][j] = fmaf(a[i].w, b[j].w, acc[i][j]);
      }
    }
  }
}

struct F32Store {
  float* out;
  int k;
  __host__ __device__ __forceinline__ void operator()(int m, int col, float v) const {
    out[static_cast<long long>(m) * k + col] = v;
  }
};

template <class Tile, class Store>
__host__ __device__ __forceinline__ void f32_epilogue(const StConvArgs& p, int m0, int n0, int tx,
                                                      int ty,
                                                      const float (&acc)[Tile::kMI][Tile::kNJ],
                                                      const Store& store) {
  const int m_total = p.n * p.to * p.ho * p.wo;
ST_UNROLL
  for (int j = 0; j < Tile::kNJ; ++j) {
    const int col = n0 + tx + 16 * j;
    if (col >= p.k) {
      continue;
    }
    const float bias = p.bias ? p.bias[col] : 0.f;
ST_UNROLL
    for (int i = 0; i < Tile::kMI; ++i) {
      const int m = m0 + ty + 16 * i;
      if (m < m_total) {
        float v = acc[i][j] + bias;
        if (p.relu) {
          v = fmaxf(v, 0.f);
        }
        store(m, col, v);
      }
    }
  }
}

template <class Tile>
__global__ void __launch_bounds__(kF32Threads)
    st_conv3d_f32_kernel(const StConvArgs p, int tiles_n) {
  using Loader = TileLoader<float, Tile::BM, Tile::BN, kF32BK, kF32Threads>;
  static_assert(Loader::kLd == kF32Ld, "f32_stage assumes the loader's pitch");
  __shared__ __align__(128) float As[kStages][Tile::BM * kF32Ld];
  __shared__ __align__(128) float Bs[kStages][Tile::BN * kF32Ld];

  const BlockTile bt = block_tile(static_cast<int>(blockIdx.x), tiles_n, Tile::BM, Tile::BN);
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid & 15;
  const int ty = tid >> 4;

  const Loader loader(p, bt.m0, bt.n0, tid);
  const int k_tiles = loader.k_tiles();

  float acc[Tile::kMI][Tile::kNJ];
ST_UNROLL
  for (int i = 0; i < Tile::kMI; ++i) {
ST_UNROLL
    for (int j = 0; j < Tile::kNJ; ++j) {
      acc[i][j] = 0.f;
    }
  }

ST_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) {
      loader.load(s, As[s], Bs[s]);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < k_tiles) {
      loader.load(next, As[next % kStages], Bs[next % kStages]);
    }
    cp_async_commit();
    f32_stage<Tile>(As[kt % kStages], Bs[kt % kStages], tx, ty, acc);
  }
  cp_async_wait<0>();

  f32_epilogue<Tile>(p, bt.m0, bt.n0, tx, ty, acc, F32Store{static_cast<float*>(p.out), p.k});
}

int ceil_div(long long a, int b) { return static_cast<int>((a + b - 1) / b); }

// The compiled tile configurations, in the order of their index (tile_config in the launcher;
// the names are what vidconv's plan reports). visit_*_tile calls f(Tile{}) for one index, so
// the launcher and tools/emulate_st_conv.cu instantiate exactly the same list.
constexpr const char* kMmaTileNames[] = {"128x64x32", "64x64x32", "64x128x32", "64x32x32"};
constexpr const char* kF32TileNames[] = {"64x64x16", "128x64x16"};
constexpr int kMmaTileCount = sizeof(kMmaTileNames) / sizeof(kMmaTileNames[0]);
constexpr int kF32TileCount = sizeof(kF32TileNames) / sizeof(kF32TileNames[0]);

template <class F>
void visit_mma_tile(int config, F&& f) {
  switch (config) {
    case 0: f(MmaTile<128, 64>{}); break;
    case 1: f(MmaTile<64, 64>{}); break;
    case 2: f(MmaTile<64, 128>{}); break;
    default: f(MmaTile<64, 32>{}); break;
  }
}

template <class F>
void visit_f32_tile(int config, F&& f) {
  switch (config) {
    case 0: f(F32Tile<64, 64>{}); break;
    default: f(F32Tile<128, 64>{}); break;
  }
}

template <typename T>
void launch_mma(const StConvArgs& args, int config, long long m_total, cudaStream_t stream) {
  visit_mma_tile(config, [&](auto tile) {
    using Tile = decltype(tile);
    const int tiles_n = ceil_div(args.k, Tile::BN);
    const int blocks = ceil_div(m_total, Tile::BM) * tiles_n;
    st_conv3d_mma_kernel<T, Tile><<<blocks, kMmaThreads, 0, stream>>>(args, tiles_n);
  });
}

}  // namespace

int channel_multiple(ConvType type) { return type == ConvType::kFloat32 ? 4 : 8; }

int tile_config_count(ConvType type) {
  return type == ConvType::kFloat32 ? kF32TileCount : kMmaTileCount;
}

const char* tile_config_name(ConvType type, int config) {
  if (config < 0 || config >= tile_config_count(type)) {
    return nullptr;
  }
  return type == ConvType::kFloat32 ? kF32TileNames[config] : kMmaTileNames[config];
}

void launch_st_conv3d(const StConvArgs& args, ConvType type, int tile_config,
                      cudaStream_t stream) {
  const long long m_total = static_cast<long long>(args.n) * args.to * args.ho * args.wo;
  if (type == ConvType::kFloat32) {
    visit_f32_tile(tile_config, [&](auto tile) {
      using Tile = decltype(tile);
      const int tiles_n = ceil_div(args.k, Tile::BN);
      const int blocks = ceil_div(m_total, Tile::BM) * tiles_n;
      st_conv3d_f32_kernel<Tile><<<blocks, kF32Threads, 0, stream>>>(args, tiles_n);
    });
  } else if (type == ConvType::kFloat16) {
    launch_mma<__half>(args, tile_config, m_total, stream);
  } else {
    launch_mma<__nv_bfloat16>(args, tile_config, m_total, stream);
  }
}

}  // namespace cuda
}  // namespace vidconv

#undef ST_UNROLL
