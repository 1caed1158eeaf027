// CPU kernels of fovea_context and crop_normalize: uint8 (N, T, H, W, 3) frames in, normalised
// (N, 3, T, S, S) streams out, written once each. crop_normalize is the fovea path alone.
//
// Work is split over output rows (n, t, i). For one row the fovea reads input row oy + i and the
// context reads the rows of bin i; a thread's chunk of consecutive rows walks down the same
// frame, so each input byte comes from memory once and the re-reads hit cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "preprocess_out.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define VIDCONV_X86_SIMD 1
#include <immintrin.h>
#endif

namespace vidconv {
namespace {

// adaptive_avg_pool2d's bins: output i of s covers input [floor(i*n/s), ceil((i+1)*n/s)).
inline int64_t bin_start(int64_t i, int64_t n, int64_t s) { return (i * n) / s; }
inline int64_t bin_end(int64_t i, int64_t n, int64_t s) { return ((i + 1) * n + s - 1) / s; }

// The mean of `count` bytes summing to `sum` as float(sum) * (1 / count), each step rounded
// once: the CUDA kernel does exactly this, so both devices give the same bits.
inline float area_mean(int64_t sum, int64_t count) {
  return static_cast<float>(sum) * (1.0f / static_cast<float>(count));
}

struct Geometry {
  int64_t n, t, h, w, s;
};

// Normalised output values by input value, per channel: the same float arithmetic as the
// per-element formula (so the same bits), done once per call instead of once per element,
// which also takes the float -> half/bfloat16 conversion out of the inner loops.
template <typename scalar_t>
std::vector<scalar_t> make_lut(int64_t values, int64_t count, const std::array<float, 3>& mean,
                               const std::array<float, 3>& inv_std) {
  std::vector<scalar_t> lut(3 * values);
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t v = 0; v < values; ++v) {
      const float x = count == 1 ? static_cast<float>(v) : area_mean(v, count);
      lut[c * values + v] = static_cast<scalar_t>((x - mean[c]) * inv_std[c]);
    }
  }
  return lut;
}

#ifdef VIDCONV_X86_SIMD
// pshufb masks that gather one channel of 16 RGB pixels (48 bytes, three 16-byte loads) into
// 16 lanes, in order or mirrored: masks[flip][channel][load][lane], 0x80 where a lane comes
// from another load.
struct DeinterleaveMasks {
  alignas(16) uint8_t m[2][3][3][16];
  DeinterleaveMasks() {
    for (int flip = 0; flip < 2; ++flip) {
      for (int c = 0; c < 3; ++c) {
        for (int load = 0; load < 3; ++load) {
          for (int lane = 0; lane < 16; ++lane) {
            const int pixel = flip ? 15 - lane : lane;
            const int byte = 3 * pixel + c;
            m[flip][c][load][lane] = byte / 16 == load ? static_cast<uint8_t>(byte % 16) : 0x80;
          }
        }
      }
    }
  }
};

// 16 pixels of one fovea row of float32 planar output (AVX2): output pixels j..j+15 read input
// pixels j..j+15, or S-1-j down to S-16-j under flip. (float(v) - mean) * inv_std in the same
// two IEEE steps as make_lut, so the same bits as the table.
__attribute__((target("avx2"), always_inline)) inline void fovea_step_f32_avx2(
    const uint8_t* src, int64_t S, bool flip, float* dst, int64_t s_c, int64_t j,
    const __m128i (&mk)[3][3], const __m256 (&mv)[3], const __m256 (&iv)[3]) {
  const uint8_t* p = src + 3 * (flip ? S - 16 - j : j);
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
  for (int c = 0; c < 3; ++c) {
    const __m128i v = _mm_or_si128(
        _mm_or_si128(_mm_shuffle_epi8(a, mk[c][0]), _mm_shuffle_epi8(b, mk[c][1])),
        _mm_shuffle_epi8(d, mk[c][2]));
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
    float* out = dst + c * s_c + j;
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_sub_ps(lo, mv[c]), iv[c]));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_sub_ps(hi, mv[c]), iv[c]));
  }
}

// One fovea row (S >= 16) of float32 planar output, 16 pixels a step and no scalar tail: a
// step at 0, then steps whose stores are 32-byte aligned in the first plane (rows are S floats
// apart, so most start off alignment, and a store across a cache line costs about two), then
// one ending at S. Overlapping steps write the same values twice.
__attribute__((target("avx2"))) void fovea_row_f32_avx2(
    const uint8_t* src, int64_t S, bool flip, float* dst, int64_t s_c,
    const std::array<float, 3>& mean, const std::array<float, 3>& inv_std) {
  static const DeinterleaveMasks masks;
  const int f = flip ? 1 : 0;
  __m128i mk[3][3];
  __m256 mv[3], iv[3];
  for (int c = 0; c < 3; ++c) {
    for (int load = 0; load < 3; ++load) {
      mk[c][load] = _mm_load_si128(reinterpret_cast<const __m128i*>(masks.m[f][c][load]));
    }
    mv[c] = _mm256_set1_ps(mean[c]);
    iv[c] = _mm256_set1_ps(inv_std[c]);
  }
  fovea_step_f32_avx2(src, S, flip, dst, s_c, 0, mk, mv, iv);
  int64_t j = static_cast<int64_t>((32 - (reinterpret_cast<uintptr_t>(dst) & 31)) & 31) /
              static_cast<int64_t>(sizeof(float));
  if (j == 0) {
    j = 16;
  }
  for (; j + 16 <= S; j += 16) {
    fovea_step_f32_avx2(src, S, flip, dst, s_c, j, mk, mv, iv);
  }
  if (j < S) {
    fovea_step_f32_avx2(src, S, flip, dst, s_c, S - 16, mk, mv, iv);
  }
}

// Whether the AVX2 row may run: the CPU has it and VIDCONV_CPU_SIMD is not "0" (the switch
// lets tests compare both paths, and is a way out should a build misbehave somewhere).
bool use_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  const char* env = std::getenv("VIDCONV_CPU_SIMD");
  return has && !(env && std::strcmp(env, "0") == 0);
}
#endif

template <typename scalar_t, bool kChannelsLast>
void fovea_context_kernel(const uint8_t* in, const Geometry& g, const int64_t* offsets,
                          const bool* flips, const std::array<float, 3>& mean,
                          const std::array<float, 3>& inv_std, scalar_t* fovea,
                          scalar_t* context) {
  const int64_t T = g.t, H = g.h, W = g.w, S = g.s;
  // Output strides of (N, 3, T, S, S): plain, or channels_last_3d = (N, T, S, S, 3) in memory.
  const int64_t s_c = kChannelsLast ? 1 : T * S * S;
  const int64_t s_t = kChannelsLast ? 3 * S * S : S * S;
  const int64_t s_i = kChannelsLast ? 3 * S : S;
  constexpr int64_t s_j = kChannelsLast ? 3 : 1;
  const int64_t s_n = 3 * T * S * S;

  const std::vector<scalar_t> fovea_lut = make_lut<scalar_t>(256, 1, mean, inv_std);
  // Column bins are the same for every row: computed once.
  std::vector<int64_t> x0(context ? S : 0), x1(context ? S : 0);
  for (int64_t j = 0; context && j < S; ++j) {
    x0[j] = bin_start(j, W, S);
    x1[j] = bin_end(j, W, S);
  }
  // When S divides H and W every bin has the same area (2x2 at 178 -> 89): a table by sum.
  const bool uniform = context && H % S == 0 && W % S == 0 && (H / S) * (W / S) <= 256;
  const int64_t area = uniform ? (H / S) * (W / S) : 0;
  const std::vector<scalar_t> context_lut =
      uniform ? make_lut<scalar_t>(255 * area + 1, area, mean, inv_std) : std::vector<scalar_t>();
  const int64_t lut_stride = 255 * area + 1;

  bool simd_rows = false;
#ifdef VIDCONV_X86_SIMD
  simd_rows = std::is_same_v<scalar_t, float> && !kChannelsLast && S >= 16 && use_avx2();
#endif

  at::parallel_for(0, g.n * T * S, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> colsum(context ? W * 3 : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (T * S), t = (r / S) % T, i = r % S;
      const int64_t oy = offsets[2 * n], ox = offsets[2 * n + 1];
      const bool flip = flips[n];
      const uint8_t* frame = in + (n * T + t) * H * W * 3;
      const int64_t out_row = n * s_n + t * s_t + i * s_i;

      // Fovea: one input row, a crop of S pixels, mirrored under flip (read backwards).
      const uint8_t* src = frame + ((oy + i) * W + ox) * 3;
#ifdef VIDCONV_X86_SIMD
      if constexpr (std::is_same_v<scalar_t, float> && !kChannelsLast) {
        if (simd_rows) {
          fovea_row_f32_avx2(src, S, flip, fovea + out_row, s_c, mean, inv_std);
        }
      }
#endif
      if (!simd_rows) {
        const uint8_t* first = flip ? src + (S - 1) * 3 : src;
        const int64_t step = flip ? -3 : 3;
        for (int64_t c = 0; c < 3; ++c) {
          scalar_t* dst = fovea + out_row + c * s_c;
          const scalar_t* lut = fovea_lut.data() + 256 * c;
          const uint8_t* p = first + c;
          for (int64_t j = 0; j < S; ++j) {
            dst[j * s_j] = lut[p[j * step]];
          }
        }
      }
      if (!context) {
        continue;
      }

      // Context: column sums over the bin's rows (exact, int32), then the column bins.
      const int64_t y0 = bin_start(i, H, S), y1 = bin_end(i, H, S);
      std::fill(colsum.begin(), colsum.end(), 0);
      for (int64_t y = y0; y < y1; ++y) {
        const uint8_t* row = frame + y * W * 3;
        for (int64_t k = 0; k < W * 3; ++k) {
          colsum[k] += row[k];
        }
      }
      for (int64_t j = 0; j < S; ++j) {
        const int64_t sj = flip ? S - 1 - j : j;
        const int64_t count = (y1 - y0) * (x1[sj] - x0[sj]);
        for (int64_t c = 0; c < 3; ++c) {
          int64_t sum = 0;
          for (int64_t x = x0[sj]; x < x1[sj]; ++x) {
            sum += colsum[x * 3 + c];
          }
          context[out_row + c * s_c + j * s_j] =
              uniform ? context_lut[c * lut_stride + sum]
                      : static_cast<scalar_t>((area_mean(sum, count) - mean[c]) * inv_std[c]);
        }
      }
    }
  });
}

void check_inputs(const char* op, const at::Tensor& clips, int64_t size, const at::Tensor& offsets,
                  const at::Tensor& flip, at::ArrayRef<double> mean, at::ArrayRef<double> std_,
                  at::ScalarType dtype) {
  TORCH_CHECK(clips.scalar_type() == at::kByte, op, ": clips must be uint8, got ",
              clips.scalar_type());
  TORCH_CHECK(clips.dim() == 5 && clips.size(4) == 3, op,
              ": clips must be (N, T, H, W, 3), got shape ", clips.sizes());
  TORCH_CHECK(clips.is_contiguous(), op, ": clips must be contiguous");
  TORCH_CHECK(size >= 1 && clips.size(2) >= size && clips.size(3) >= size, op,
              ": frames must be at least size x size = ", size, "x", size, ", got ",
              clips.size(2), "x", clips.size(3));
  const int64_t n = clips.size(0);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 2 && offsets.size(0) == n &&
                  offsets.size(1) == 2 && offsets.is_contiguous(),
              op, ": offsets must be contiguous int64 (", n, ", 2), got ", offsets.scalar_type(),
              " ", offsets.sizes());
  TORCH_CHECK(flip.scalar_type() == at::kBool && flip.dim() == 1 && flip.size(0) == n &&
                  flip.is_contiguous(),
              op, ": flip must be contiguous bool (", n, ",), got ", flip.scalar_type(), " ",
              flip.sizes());
  TORCH_CHECK(offsets.device() == clips.device() && flip.device() == clips.device(), op,
              ": offsets and flip must be on clips' device ", clips.device());
  TORCH_CHECK(mean.size() == 3 && std_.size() == 3, op, ": mean and std must have 3 entries");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
}

at::Tensor new_output(const at::Tensor& clips, int64_t size, at::ScalarType dtype,
                      bool channels_last) {
  return at::empty({clips.size(0), 3, clips.size(1), size, size}, clips.options().dtype(dtype),
                   channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous);
}

void run(const char* op, const at::Tensor& clips, int64_t size, const at::Tensor& offsets,
         const at::Tensor& flip, at::ArrayRef<double> mean, at::ArrayRef<double> std_,
         bool channels_last, at::Tensor& fovea, at::Tensor* context) {
  const Geometry g{clips.size(0), clips.size(1), clips.size(2), clips.size(3), size};
  if (g.n == 0 || g.t == 0) {
    return;
  }
  // Out-of-range offsets would read outside the frame: checked here too, as it is cheap on CPU.
  const int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t k = 0; k < g.n; ++k) {
    TORCH_CHECK(off[2 * k] >= 0 && off[2 * k] <= g.h - size && off[2 * k + 1] >= 0 &&
                    off[2 * k + 1] <= g.w - size,
                op, ": offsets[", k, "] = (", off[2 * k], ", ", off[2 * k + 1],
                ") out of range for ", g.h, "x", g.w, " frames and size ", size);
  }
  const std::array<float, 3> m{static_cast<float>(mean[0]), static_cast<float>(mean[1]),
                               static_cast<float>(mean[2])};
  // (x - mean) * (1 / std) rather than a division per element; the CUDA kernel does the same.
  const std::array<float, 3> inv_sd{1.0f / static_cast<float>(std_[0]),
                                    1.0f / static_cast<float>(std_[1]),
                                    1.0f / static_cast<float>(std_[2])};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fovea.scalar_type(),
                                  "vidconv_preprocess_cpu", [&] {
    scalar_t* ctx = context ? context->data_ptr<scalar_t>() : nullptr;
    if (channels_last) {
      fovea_context_kernel<scalar_t, true>(clips.data_ptr<uint8_t>(), g, off,
                                           flip.data_ptr<bool>(), m, inv_sd,
                                           fovea.data_ptr<scalar_t>(), ctx);
    } else {
      fovea_context_kernel<scalar_t, false>(clips.data_ptr<uint8_t>(), g, off,
                                            flip.data_ptr<bool>(), m, inv_sd,
                                            fovea.data_ptr<scalar_t>(), ctx);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fovea_context_cpu(const at::Tensor& clips, int64_t size,
                                                      const at::Tensor& offsets,
                                                      const at::Tensor& flip,
                                                      at::ArrayRef<double> mean,
                                                      at::ArrayRef<double> std_,
                                                      at::ScalarType dtype, bool channels_last) {
  check_inputs("fovea_context", clips, size, offsets, flip, mean, std_, dtype);
  at::Tensor fovea = new_output(clips, size, dtype, channels_last);
  at::Tensor context = new_output(clips, size, dtype, channels_last);
  run("fovea_context", clips, size, offsets, flip, mean, std_, channels_last, fovea, &context);
  return {fovea, context};
}

at::Tensor crop_normalize_cpu(const at::Tensor& clips, int64_t size, const at::Tensor& offsets,
                              const at::Tensor& flip, at::ArrayRef<double> mean,
                              at::ArrayRef<double> std_, at::ScalarType dtype,
                              bool channels_last) {
  check_inputs("crop_normalize", clips, size, offsets, flip, mean, std_, dtype);
  at::Tensor out = new_output(clips, size, dtype, channels_last);
  run("crop_normalize", clips, size, offsets, flip, mean, std_, channels_last, out, nullptr);
  return out;
}

// The out= overloads: the caller's tensors (e.g. a loader's reused batch buffers) instead of
// fresh ones, whose first write would fault every page in. Layout and dtype come from `out`.
void fovea_context_out_cpu(
    const at::Tensor& clips, int64_t size, const at::Tensor& offsets, const at::Tensor& flip,
    at::ArrayRef<double> mean, at::ArrayRef<double> std_, at::Tensor& fovea,
    at::Tensor& context) {
  check_out_dtype("fovea_context", "fovea", fovea);
  check_inputs("fovea_context", clips, size, offsets, flip, mean, std_, fovea.scalar_type());
  check_out("fovea_context", "fovea", clips, size, fovea);
  check_out("fovea_context", "context", clips, size, context);
  check_out_pair(fovea, context);
  run("fovea_context", clips, size, offsets, flip, mean, std_, out_is_channels_last(fovea),
      fovea, &context);
}

void crop_normalize_out_cpu(const at::Tensor& clips, int64_t size,
                            const at::Tensor& offsets, const at::Tensor& flip,
                            at::ArrayRef<double> mean, at::ArrayRef<double> std_,
                            at::Tensor& out) {
  check_out_dtype("crop_normalize", "out", out);
  check_inputs("crop_normalize", clips, size, offsets, flip, mean, std_, out.scalar_type());
  check_out("crop_normalize", "out", clips, size, out);
  run("crop_normalize", clips, size, offsets, flip, mean, std_, out_is_channels_last(out), out,
      nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(vidconv, CPU, m) {
  m.impl("fovea_context", &fovea_context_cpu);
  m.impl("crop_normalize", &crop_normalize_cpu);
  m.impl("fovea_context.out", &fovea_context_out_cpu);
  m.impl("crop_normalize.out", &crop_normalize_out_cpu);
}

}  // namespace vidconv
