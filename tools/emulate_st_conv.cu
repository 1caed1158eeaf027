// Host emulation of csrc/cuda/st_conv3d_kernel.cu (no GPU needed): every block and thread of a
// launch is stepped on the CPU through the kernel's own __host__ __device__ pieces (block_tile,
// TileLoader, f32_stage, mma_a_offset/mma_b_offset, both epilogues); cp.async runs as a
// synchronous copy. Run through tools/emulate_st_conv.py, which prepares the inputs and compares
// the output with PyTorch.
//
// Checked here, per block and reduction tile: every shared-memory slot of A and B holds exactly
// the implicit-im2col / weight element it should (or zero past an edge), skew columns are never
// written; per output element: written exactly once. The fp32 path is emulated completely
// (FFMA order included, so its output is what the device computes). ldmatrix.x4 and
// mma.m16n8k16 are warp-collective and are modelled here from the PTX ISA's fragment layouts;
// the order of the 16-term sums inside one mma is the hardware's and is not reproduced (float
// sums in k order here).
//
// Every tile configuration the launcher can run is emulated through the same visit_*_tile list
// (TILE selects one, as tile_config does in launch_st_conv3d).
//
// Usage: emulate_st_conv --tiles TYPE   (lists TYPE's tile names)
//        emulate_st_conv TYPE TILE N C T H W K kt kh kw st sh sw pt ph pw relu has_bias DIR
//   TYPE 0 float32, 1 float16, 2 bfloat16; TILE 0 .. tile_config_count(TYPE) - 1;
//   C already padded to the kernel's channel multiple.
//   DIR/x.bin (N,T,H,W,C), DIR/w.bin (K,kt,kh,kw,C) in TYPE, DIR/b.bin float32 (K,) if has_bias.
//   Writes DIR/out.bin (N,T',H',W',K) in TYPE, starting from 0xFF bytes (NaN) everywhere.
#include "cuda/st_conv3d_kernel.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace vidconv::cuda;

namespace {

long long g_bad_smem = 0, g_bad_skew = 0;
std::vector<int> g_writes;

template <typename T>
std::vector<T> read_file(const char* dir, const char* name, size_t count) {
  std::vector<T> v(count);
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "rb");
  if (f == nullptr || fread(v.data(), sizeof(T), count, f) != count) {
    fprintf(stderr, "cannot read %zu elements from %s\n", count, path);
    exit(2);
  }
  fclose(f);
  return v;
}

template <typename T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// The element of the implicit im2col matrix A[m, r] (r in (dt, dy, dx, c) order), written from
// the definition of the convolution rather than from the kernel's vector decode.
template <typename T>
T im2col(const StConvArgs& p, const T* x, int m, int r) {
  const int m_total = p.n * p.to * p.ho * p.wo;
  const int r_total = p.kt * p.kh * p.kw * p.c;
  if (m >= m_total || r >= r_total) return T(0.f);
  const int ow = m % p.wo, oh = (m / p.wo) % p.ho, ot = (m / p.wo / p.ho) % p.to;
  const int n = m / p.wo / p.ho / p.to;
  const int c = r % p.c, dx = (r / p.c) % p.kw, dy = (r / p.c / p.kw) % p.kh;
  const int dt = r / p.c / p.kw / p.kh;
  const int ti = ot * p.st - p.pt + dt, hi = oh * p.sh - p.ph + dy, wi = ow * p.sw - p.pw + dx;
  if (ti < 0 || ti >= p.t || hi < 0 || hi >= p.h || wi < 0 || wi >= p.w) return T(0.f);
  return x[((((long long)n * p.t + ti) * p.h + hi) * p.w + wi) * p.c + c];
}

template <typename T>
T weight_at(const StConvArgs& p, const T* w, int kf, int r) {
  const int r_total = p.kt * p.kh * p.kw * p.c;
  if (kf >= p.k || r >= r_total) return T(0.f);
  return w[(long long)kf * r_total + r];
}

// Compares one freshly loaded stage with the definition; poison must survive in the skew columns.
template <typename T, int BM, int BN, int BK, int LD>
void check_stage(const StConvArgs& p, int m0, int n0, int tile, const T* As, const T* Bs,
                 const T& poison) {
  const T* x = static_cast<const T*>(p.input);
  const T* w = static_cast<const T*>(p.weight);
  for (int row = 0; row < BM; ++row) {
    for (int col = 0; col < LD; ++col) {
      const T got = As[row * LD + col];
      if (col < BK) {
        g_bad_smem += !same_bits(got, im2col(p, x, m0 + row, tile * BK + col));
      } else {
        g_bad_skew += !same_bits(got, poison);
      }
    }
  }
  for (int row = 0; row < BN; ++row) {
    for (int col = 0; col < LD; ++col) {
      const T got = Bs[row * LD + col];
      if (col < BK) {
        g_bad_smem += !same_bits(got, weight_at(p, w, n0 + row, tile * BK + col));
      } else {
        g_bad_skew += !same_bits(got, poison);
      }
    }
  }
}

struct CountingF32Store {
  F32Store inner;
  void operator()(int m, int col, float v) const {
    ++g_writes[(size_t)m * inner.k + col];
    inner(m, col, v);
  }
};

template <typename T>
struct CountingPairStore {
  PairStore<T> inner;
  void operator()(int m, int col, float v0, float v1, bool has1) const {
    ++g_writes[(size_t)m * inner.k + col];
    if (has1) ++g_writes[(size_t)m * inner.k + col + 1];
    inner(m, col, v0, v1, has1);
  }
};

template <class Tile>
void run_f32(const StConvArgs& p) {
  constexpr int kF32BM = Tile::BM, kF32BN = Tile::BN, kAcc = Tile::kMI * Tile::kNJ;
  using Acc = float[Tile::kMI][Tile::kNJ];
  using Loader = TileLoader<float, kF32BM, kF32BN, kF32BK, kF32Threads>;
  const long long m_total = (long long)p.n * p.to * p.ho * p.wo;
  const int tiles_n = ceil_div(p.k, kF32BN);
  const int blocks = ceil_div(m_total, kF32BM) * tiles_n;
  float poison;
  std::memset(&poison, 0xCD, sizeof poison);
  std::vector<float> As(kStages * kF32BM * kF32Ld), Bs(kStages * kF32BN * kF32Ld);
  for (int block = 0; block < blocks; ++block) {
    const BlockTile bt = block_tile(block, tiles_n, kF32BM, kF32BN);
    std::vector<Loader> loaders;
    for (int tid = 0; tid < kF32Threads; ++tid) loaders.emplace_back(p, bt.m0, bt.n0, tid);
    std::vector<float> acc(kF32Threads * kAcc, 0.f);
    const int k_tiles = loaders[0].k_tiles();
    auto stage_a = [&](int s) { return As.data() + s * kF32BM * kF32Ld; };
    auto stage_b = [&](int s) { return Bs.data() + s * kF32BN * kF32Ld; };
    auto load = [&](int tile) {
      const int s = tile % kStages;
      std::fill(stage_a(s), stage_a(s) + kF32BM * kF32Ld, poison);
      std::fill(stage_b(s), stage_b(s) + kF32BN * kF32Ld, poison);
      for (auto& l : loaders) l.load(tile, stage_a(s), stage_b(s));
      check_stage<float, kF32BM, kF32BN, kF32BK, kF32Ld>(p, bt.m0, bt.n0, tile, stage_a(s),
                                                         stage_b(s), poison);
    };
    // The kernel's order: prologue of kStages - 1 tiles, then load tile kt + 2 before the
    // product of tile kt (into the stage tile kt - 1 used).
    for (int s = 0; s < kStages - 1 && s < k_tiles; ++s) load(s);
    for (int kt = 0; kt < k_tiles; ++kt) {
      if (kt + kStages - 1 < k_tiles) load(kt + kStages - 1);
      for (int tid = 0; tid < kF32Threads; ++tid) {
        f32_stage<Tile>(stage_a(kt % kStages), stage_b(kt % kStages), tid & 15, tid >> 4,
                        *reinterpret_cast<Acc*>(&acc[tid * kAcc]));
      }
    }
    for (int tid = 0; tid < kF32Threads; ++tid) {
      f32_epilogue<Tile>(p, bt.m0, bt.n0, tid & 15, tid >> 4,
                         *reinterpret_cast<const Acc*>(&acc[tid * kAcc]),
                         CountingF32Store{F32Store{static_cast<float*>(p.out), p.k}});
    }
  }
}

template <typename T>
float to_float(T v);
template <>
float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// ldmatrix.x4 (no .trans) over a warp: matrix r's row addresses come from lanes 8r..8r+7; lane
// L receives from each matrix row L/4, elements 2(L%4) and 2(L%4)+1, packed low/high.
template <typename T>
void ldmatrix_x4_warp(const T* smem, const int (&offset)[32], unsigned (&regs)[32][4]) {
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 4; ++r) {
      const T* row = smem + offset[8 * r + lane / 4];
      unsigned lo = 0, hi = 0;
      std::memcpy(&lo, row + 2 * (lane % 4), 2);
      std::memcpy(&hi, row + 2 * (lane % 4) + 1, 2);
      regs[lane][r] = lo | (hi << 16);
    }
  }
}

template <typename T>
float half_of(unsigned reg, int which) {
  const unsigned short bits = static_cast<unsigned short>(which ? reg >> 16 : reg & 0xFFFF);
  T v;
  std::memcpy(&v, &bits, 2);
  return to_float<T>(v);
}

// mma.m16n8k16.row.col with fp32 accumulate, per the PTX ISA fragment tables (g = lane / 4,
// q = lane % 4): A reg0 (g, 2q..2q+1), reg1 (g+8, 2q..), reg2 (g, 2q+8..), reg3 (g+8, 2q+8..);
// B reg0 (k 2q..2q+1, n g), reg1 (k 2q+8.., n g); C/D e0,e1 (g, 2q..2q+1), e2,e3 (g+8, 2q..).
template <typename T>
void mma_warp(float (&d)[32][4], const unsigned (&a)[32][4], const unsigned (&b0)[32],
              const unsigned (&b1)[32]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, q = lane % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * q + e] = half_of<T>(a[lane][0], e);
      A[g + 8][2 * q + e] = half_of<T>(a[lane][1], e);
      A[g][2 * q + 8 + e] = half_of<T>(a[lane][2], e);
      A[g + 8][2 * q + 8 + e] = half_of<T>(a[lane][3], e);
      B[2 * q + e][g] = half_of<T>(b0[lane], e);
      B[2 * q + 8 + e][g] = half_of<T>(b1[lane], e);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, q = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, col = 2 * q + (e & 1);
      float s = d[lane][e];
      for (int k = 0; k < 16; ++k) s = fmaf(A[row][k], B[k][col], s);
      d[lane][e] = s;
    }
  }
}

template <typename T, class Tile>
void run_mma(const StConvArgs& p) {
  constexpr int kMmaBM = Tile::BM, kMmaBN = Tile::BN, kMI = Tile::kMI, kNJ = Tile::kNJ;
  using Loader = TileLoader<T, kMmaBM, kMmaBN, kMmaBK, kMmaThreads>;
  const long long m_total = (long long)p.n * p.to * p.ho * p.wo;
  const int tiles_n = ceil_div(p.k, kMmaBN);
  const int blocks = ceil_div(m_total, kMmaBM) * tiles_n;
  T poison;
  std::memset(&poison, 0xCD, sizeof poison);
  std::vector<T> As(kStages * kMmaBM * kMmaLd), Bs(kStages * kMmaBN * kMmaLd);
  static float acc[4][32][kMI][kNJ][4];  // warp, lane, i, j, e
  for (int block = 0; block < blocks; ++block) {
    const BlockTile bt = block_tile(block, tiles_n, kMmaBM, kMmaBN);
    std::vector<Loader> loaders;
    for (int tid = 0; tid < kMmaThreads; ++tid) loaders.emplace_back(p, bt.m0, bt.n0, tid);
    std::memset(acc, 0, sizeof acc);
    const int k_tiles = loaders[0].k_tiles();
    auto stage_a = [&](int s) { return As.data() + s * kMmaBM * kMmaLd; };
    auto stage_b = [&](int s) { return Bs.data() + s * kMmaBN * kMmaLd; };
    auto load = [&](int tile) {
      const int s = tile % kStages;
      std::fill(stage_a(s), stage_a(s) + kMmaBM * kMmaLd, poison);
      std::fill(stage_b(s), stage_b(s) + kMmaBN * kMmaLd, poison);
      for (auto& l : loaders) l.load(tile, stage_a(s), stage_b(s));
      check_stage<T, kMmaBM, kMmaBN, kMmaBK, kMmaLd>(p, bt.m0, bt.n0, tile, stage_a(s),
                                                     stage_b(s), poison);
    };
    for (int s = 0; s < kStages - 1 && s < k_tiles; ++s) load(s);
    for (int kt = 0; kt < k_tiles; ++kt) {
      if (kt + kStages - 1 < k_tiles) load(kt + kStages - 1);
      const T* a_s = stage_a(kt % kStages);
      const T* b_s = stage_b(kt % kStages);
      for (int warp = 0; warp < 4; ++warp) {
        for (int kk = 0; kk < kMmaBK; kk += 16) {
          unsigned a[kMI][32][4], b[kNJ / 2][32][4];
          int off[32];
          for (int i = 0; i < kMI; ++i) {
            for (int lane = 0; lane < 32; ++lane) {
              off[lane] = mma_a_offset<Tile>(warp, lane, i, kk);
            }
            ldmatrix_x4_warp(a_s, off, a[i]);
          }
          for (int j = 0; j < kNJ / 2; ++j) {
            for (int lane = 0; lane < 32; ++lane) {
              off[lane] = mma_b_offset<Tile>(warp, lane, j, kk);
            }
            ldmatrix_x4_warp(b_s, off, b[j]);
          }
          // The kernel's operand choice: n8 tile j takes registers (j&1)*2, +1 of pair j>>1.
          for (int i = 0; i < kMI; ++i) {
            for (int j = 0; j < kNJ; ++j) {
              float d[32][4];
              unsigned r0[32], r1[32];
              for (int lane = 0; lane < 32; ++lane) {
                for (int e = 0; e < 4; ++e) d[lane][e] = acc[warp][lane][i][j][e];
                r0[lane] = b[j >> 1][lane][(j & 1) * 2];
                r1[lane] = b[j >> 1][lane][(j & 1) * 2 + 1];
              }
              mma_warp<T>(d, a[i], r0, r1);
              for (int lane = 0; lane < 32; ++lane) {
                for (int e = 0; e < 4; ++e) acc[warp][lane][i][j][e] = d[lane][e];
              }
            }
          }
        }
      }
    }
    for (int warp = 0; warp < 4; ++warp) {
      for (int lane = 0; lane < 32; ++lane) {
        mma_epilogue<Tile>(p, bt.m0, bt.n0, warp, lane, acc[warp][lane],
                           CountingPairStore<T>{PairStore<T>{static_cast<T*>(p.out), p.k}});
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--tiles") == 0) {
    // emulate_st_conv --tiles TYPE: the tile names, one per line, in tile_config order.
    const ConvType ct = static_cast<ConvType>(atoi(argv[2]));
    for (int i = 0; i < tile_config_count(ct); ++i) printf("%s\n", tile_config_name(ct, i));
    return 0;
  }
  if (argc != 21) {
    fprintf(stderr,
            "usage: %s TYPE TILE N C T H W K kt kh kw st sh sw pt ph pw relu has_bias DIR\n",
            argv[0]);
    return 2;
  }
  const int type = atoi(argv[1]);
  const int tile = atoi(argv[2]);
  int v[18];
  v[0] = type;
  for (int i = 1; i < 18; ++i) v[i] = atoi(argv[2 + i]);
  const char* dir = argv[20];
  StConvArgs p{};
  p.n = v[1]; p.c = v[2]; p.t = v[3]; p.h = v[4]; p.w = v[5]; p.k = v[6];
  p.kt = v[7]; p.kh = v[8]; p.kw = v[9]; p.st = v[10]; p.sh = v[11]; p.sw = v[12];
  p.pt = v[13]; p.ph = v[14]; p.pw = v[15]; p.relu = v[16] != 0;
  p.to = (p.t + 2 * p.pt - p.kt) / p.st + 1;
  p.ho = (p.h + 2 * p.ph - p.kh) / p.sh + 1;
  p.wo = (p.w + 2 * p.pw - p.kw) / p.sw + 1;
  const ConvType ct = static_cast<ConvType>(type);
  if (tile < 0 || tile >= tile_config_count(ct)) {
    fprintf(stderr, "TILE=%d is not in [0, %d)\n", tile, tile_config_count(ct));
    return 2;
  }
  if (p.c % channel_multiple(ct) != 0) {
    fprintf(stderr, "C=%d is not a multiple of %d\n", p.c, channel_multiple(ct));
    return 2;
  }
  const size_t esz = type == 0 ? 4 : 2;
  const size_t nx = (size_t)p.n * p.t * p.h * p.w * p.c;
  const size_t nw = (size_t)p.k * p.kt * p.kh * p.kw * p.c;
  const size_t nout = (size_t)p.n * p.to * p.ho * p.wo * p.k;
  // 16-byte aligned buffers, as cp.async requires of the device ones.
  std::vector<uint4> xbuf((nx * esz + 15) / 16 + 1), wbuf((nw * esz + 15) / 16 + 1);
  std::vector<uint4> obuf((nout * esz + 15) / 16 + 1);
  const std::vector<unsigned char> xb = read_file<unsigned char>(dir, "x.bin", nx * esz);
  const std::vector<unsigned char> wb = read_file<unsigned char>(dir, "w.bin", nw * esz);
  std::memcpy(xbuf.data(), xb.data(), xb.size());
  std::memcpy(wbuf.data(), wb.data(), wb.size());
  std::memset(obuf.data(), 0xFF, obuf.size() * 16);
  std::vector<float> bias;
  if (v[17]) bias = read_file<float>(dir, "b.bin", p.k);
  p.input = xbuf.data();
  p.weight = wbuf.data();
  p.bias = v[17] ? bias.data() : nullptr;
  p.out = obuf.data();
  g_writes.assign(nout, 0);
  if (ct == ConvType::kFloat32) {
    visit_f32_tile(tile, [&](auto t) { run_f32<decltype(t)>(p); });
  } else if (ct == ConvType::kFloat16) {
    visit_mma_tile(tile, [&](auto t) { run_mma<__half, decltype(t)>(p); });
  } else {
    visit_mma_tile(tile, [&](auto t) { run_mma<__nv_bfloat16, decltype(t)>(p); });
  }
  long long unwritten = 0, rewritten = 0;
  for (int c : g_writes) {
    unwritten += c == 0;
    rewritten += c > 1;
  }
  char path[1024];
  snprintf(path, sizeof path, "%s/out.bin", dir);
  FILE* f = fopen(path, "wb");
  fwrite(obuf.data(), 1, nout * esz, f);
  fclose(f);
  printf("tile=%s bad_smem=%lld bad_skew=%lld unwritten=%lld rewritten=%lld outputs=%zu\n",
         tile_config_name(ct, tile), g_bad_smem, g_bad_skew, unwritten, rewritten, nout);
  return 0;
}
