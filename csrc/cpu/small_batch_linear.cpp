// CPU kernel of small_batch_linear: y (M, O) = x (M, K) W (O, K)^T + b for the few rows of an FC
// layer's batch (the paper's 8-32 clips against weight matrices of up to 4096 x 25,088).
//
// Such a GEMM does M multiply-adds per weight it reads, so at M <= 32 it is bound by reading W
// once from memory: on the 2-core machine this project is developed on, a plain sum over a 103 MB
// weight matrix took 5 ms while oneDNN/MKL's GEMM took 30 ms for 8 rows against it (3.4 GB/s).
// Here every thread streams its own band of weight rows exactly once: for a group of weight rows
// it runs the dot products with every row of x, four x rows at a time (twelve AVX2 accumulators:
// three weight rows x four x rows), so W comes from memory once and x, which is small, from cache.
//
// Accumulation is float32 in 8 lanes, summed at the end of each dot product (float64 in scalar
// order for float64), so results differ from MKL's by summation order only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VIDCONV_LINEAR_AVX2 1
#endif

namespace vidconv {
namespace {

// Weight rows per group: each group's rows are streamed once, against every row of x.
constexpr int kRows = 3;

// Dot products of weight rows w[0..NW) with x rows x[0..NB) (each K long, x rows `ldx` apart):
// out[b * NW + a] = sum_k x[b][k] w[a][k]. Portable: float64 accumulation for float64.
template <typename scalar_t, typename acc_t>
void dots_scalar(const scalar_t* x, int64_t ldx, int64_t nb, const scalar_t* const* w, int64_t nw,
                 int64_t K, acc_t* out) {
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t a = 0; a < nw; ++a) {
      acc_t s = 0;
      const scalar_t* xr = x + b * ldx;
      const scalar_t* wr = w[a];
      for (int64_t k = 0; k < K; ++k) {
        s += static_cast<acc_t>(xr[k]) * static_cast<acc_t>(wr[k]);
      }
      out[b * nw + a] = s;
    }
  }
}

#ifdef VIDCONV_LINEAR_AVX2
__attribute__((target("avx2,fma"), always_inline)) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// NB x rows (1-4) against kRows weight rows w[0..kRows) (a short last group repeats its last
// row): 12 accumulators at NB = 4, enough independent FMAs to cover their latency, with x read
// straight from memory as the FMAs' third operand.
template <int NB>
__attribute__((target("avx2,fma"))) void dots_avx2(const float* x, int64_t ldx,
                                                   const float* const* w, int64_t K, float* out) {
  const float* w0 = w[0];
  const float* w1 = w[1];
  const float* w2 = w[2];
  __m256 acc[NB][kRows];
  for (int b = 0; b < NB; ++b) {
    for (int a = 0; a < kRows; ++a) {
      acc[b][a] = _mm256_setzero_ps();
    }
  }
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 a0 = _mm256_loadu_ps(w0 + k);
    const __m256 a1 = _mm256_loadu_ps(w1 + k);
    const __m256 a2 = _mm256_loadu_ps(w2 + k);
    for (int b = 0; b < NB; ++b) {
      const __m256 v = _mm256_loadu_ps(x + b * ldx + k);
      acc[b][0] = _mm256_fmadd_ps(v, a0, acc[b][0]);
      acc[b][1] = _mm256_fmadd_ps(v, a1, acc[b][1]);
      acc[b][2] = _mm256_fmadd_ps(v, a2, acc[b][2]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const float* xr = x + b * ldx;
    for (int a = 0; a < kRows; ++a) {
      float s = hsum(acc[b][a]);
      for (int64_t j = k; j < K; ++j) {
        s += xr[j] * w[a][j];
      }
      out[kRows * b + a] = s;
    }
  }
}

// Whether the AVX2 path may run: the CPU has AVX2 and FMA, and VIDCONV_CPU_SIMD is not "0"
// (the switch lets the tests compare both paths).
bool use_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("VIDCONV_CPU_SIMD");
  return has && !(env && std::strcmp(env, "0") == 0);
}
#endif

template <typename scalar_t>
void small_batch_linear_kernel(const scalar_t* x, const scalar_t* w, const scalar_t* bias,
                               int64_t M, int64_t K, int64_t O, scalar_t* y) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  bool simd = false;
#ifdef VIDCONV_LINEAR_AVX2
  simd = std::is_same_v<scalar_t, float> && use_avx2();
#endif
  const int64_t groups = (O + kRows - 1) / kRows;
  // A group of weight rows is kRows * K values: grain so each task streams ~256 KB of W or more.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kRows * std::max<int64_t>(K, 1)));
  // The reduction runs in chunks of kChunk features: a group's chunk of weight rows (24 KB)
  // stays in L1 across the blocks of x rows, and a chunk of x (M x kChunk: 256 KB at 32 rows)
  // in L2 while the task's weight rows stream past it. Partial sums go to y.
  constexpr int64_t kChunk = 2048;
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    acc_t out[4 * kRows];
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kc = std::min(kChunk, K - k0);
      const bool first = k0 == 0, last = k0 + kc == K;
      for (int64_t g = begin; g < end; ++g) {
        const int64_t o0 = kRows * g;
        const int64_t nw = std::min<int64_t>(kRows, O - o0);
        const scalar_t* rows[kRows];
        for (int a = 0; a < kRows; ++a) {
          rows[a] = w + (o0 + std::min<int64_t>(a, nw - 1)) * K + k0;
        }
        for (int64_t b0 = 0; b0 < M; b0 += 4) {
          const int64_t nb = std::min<int64_t>(4, M - b0);
          const scalar_t* xb = x + b0 * K + k0;
#ifdef VIDCONV_LINEAR_AVX2
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (simd) {
              switch (nb) {
                case 4: dots_avx2<4>(xb, K, rows, kc, out); break;
                case 3: dots_avx2<3>(xb, K, rows, kc, out); break;
                case 2: dots_avx2<2>(xb, K, rows, kc, out); break;
                default: dots_avx2<1>(xb, K, rows, kc, out); break;
              }
            }
          }
#endif
          if (!simd) {
            dots_scalar<scalar_t, acc_t>(xb, K, nb, rows, kRows, kc, out);
          }
          for (int64_t b = 0; b < nb; ++b) {
            scalar_t* yr = y + (b0 + b) * O + o0;
            for (int64_t a = 0; a < nw; ++a) {
              acc_t v = out[kRows * b + a];
              if (!first) {
                v += static_cast<acc_t>(yr[a]);
              }
              if (last && bias) {
                v += static_cast<acc_t>(bias[o0 + a]);
              }
              yr[a] = static_cast<scalar_t>(v);
            }
          }
        }
      }
    }
  });
}

// ---- gradients ----------------------------------------------------------------------------
// Both also read or write an O x K matrix once for the few rows of the batch. Weight gradient:
// row o of dW is sum_n g[n][o] x[n], so each task writes its own band of dW rows once, with x
// (small) from cache. Input gradient: dx = g W reads W once, row by row as it lies in memory;
// each task owns a band of W's rows and sums into its own M x K partial, added up at the end.

#ifdef VIDCONV_LINEAR_AVX2
// Columns [k, k + 32) of dW rows o0, o1 (= gT rows g0, g1): 8 accumulators, 4 x loads and two
// broadcasts per batch row.
__attribute__((target("avx2,fma"))) void weight_grad_block_avx2(const float* g0, const float* g1,
                                                                const float* x, int64_t M,
                                                                int64_t K, int64_t k, float* d0,
                                                                float* d1) {
  __m256 a0[4], a1[4];
  for (int j = 0; j < 4; ++j) {
    a0[j] = _mm256_setzero_ps();
    a1[j] = _mm256_setzero_ps();
  }
  for (int64_t n = 0; n < M; ++n) {
    const float* xr = x + n * K + k;
    const __m256 b0 = _mm256_broadcast_ss(g0 + n);
    const __m256 b1 = _mm256_broadcast_ss(g1 + n);
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_loadu_ps(xr + 8 * j);
      a0[j] = _mm256_fmadd_ps(v, b0, a0[j]);
      a1[j] = _mm256_fmadd_ps(v, b1, a1[j]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(d0 + k + 8 * j, a0[j]);
    if (d1) {
      _mm256_storeu_ps(d1 + k + 8 * j, a1[j]);
    }
  }
}

// P[n][k0, k0 + kc) += sum_a g[n][o_a] W[o_a][k0, k0 + kc) over 8 weight rows w[a] (already
// offset to k0), for every batch row n: the rows' chunk stays in L1 across the batch rows.
__attribute__((target("avx2,fma"))) void input_grad_rows8_avx2(const float* g, int64_t O,
                                                               const float* const* w, int64_t M,
                                                               int64_t K, int64_t kc, float* P) {
  for (int64_t n = 0; n < M; ++n) {
    __m256 b[8];
    for (int a = 0; a < 8; ++a) {
      b[a] = _mm256_broadcast_ss(g + n * O + a);
    }
    float* pr = P + n * K;
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
      __m256 lo = _mm256_loadu_ps(pr + k);
      __m256 hi = _mm256_mul_ps(_mm256_loadu_ps(w[4] + k), b[4]);
      lo = _mm256_fmadd_ps(_mm256_loadu_ps(w[0] + k), b[0], lo);
      hi = _mm256_fmadd_ps(_mm256_loadu_ps(w[5] + k), b[5], hi);
      lo = _mm256_fmadd_ps(_mm256_loadu_ps(w[1] + k), b[1], lo);
      hi = _mm256_fmadd_ps(_mm256_loadu_ps(w[6] + k), b[6], hi);
      lo = _mm256_fmadd_ps(_mm256_loadu_ps(w[2] + k), b[2], lo);
      hi = _mm256_fmadd_ps(_mm256_loadu_ps(w[7] + k), b[7], hi);
      lo = _mm256_fmadd_ps(_mm256_loadu_ps(w[3] + k), b[3], lo);
      _mm256_storeu_ps(pr + k, _mm256_add_ps(lo, hi));
    }
    for (; k < kc; ++k) {
      float s = 0.f;
      for (int a = 0; a < 8; ++a) {
        s += g[n * O + a] * w[a][k];
      }
      pr[k] += s;
    }
  }
}
#endif

template <typename scalar_t>
void weight_grad_kernel(const scalar_t* gT, const scalar_t* x, int64_t M, int64_t K, int64_t O,
                        scalar_t* dw) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  bool simd = false;
#ifdef VIDCONV_LINEAR_AVX2
  simd = std::is_same_v<scalar_t, float> && use_avx2();
#endif
  // Chunks of x's columns (M x 1024: 128 KB at 32 rows) stay in L2 across a task's dW rows.
  constexpr int64_t kChunk = 1024;
  const int64_t pairs = (O + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (2 * std::max<int64_t>(K, 1)));
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kend = std::min(K, k0 + kChunk);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t o0 = 2 * p;
        const bool two = o0 + 1 < O;
        int64_t k = k0;
#ifdef VIDCONV_LINEAR_AVX2
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (simd) {
            for (; k + 32 <= kend; k += 32) {
              weight_grad_block_avx2(gT + o0 * M, gT + (two ? o0 + 1 : o0) * M, x, M, K, k,
                                     dw + o0 * K, two ? dw + (o0 + 1) * K : nullptr);
            }
          }
        }
#endif
        for (int64_t a = 0; a < (two ? 2 : 1); ++a) {
          const scalar_t* gr = gT + (o0 + a) * M;
          scalar_t* dr = dw + (o0 + a) * K;
          for (int64_t j = k; j < kend; ++j) {
            acc_t s = 0;
            for (int64_t n = 0; n < M; ++n) {
              s += static_cast<acc_t>(gr[n]) * static_cast<acc_t>(x[n * K + j]);
            }
            dr[j] = static_cast<scalar_t>(s);
          }
        }
      }
    }
  });
}

// Adds rows [o_begin, o_end) of g W into P (M x K, float32 or float64 accumulation).
template <typename scalar_t>
void input_grad_band(const scalar_t* g, const scalar_t* w, int64_t M, int64_t K, int64_t O,
                     int64_t o_begin, int64_t o_end, bool simd, scalar_t* P) {
  // Chunks of 512 columns: 8 weight rows' chunk is 16 KB, in L1 across the batch rows.
  constexpr int64_t kChunk = 512;
  int64_t o = o_begin;
#ifdef VIDCONV_LINEAR_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd) {
      for (; o + 8 <= o_end; o += 8) {
        for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
          const float* rows[8];
          for (int a = 0; a < 8; ++a) {
            rows[a] = w + (o + a) * K + k0;
          }
          input_grad_rows8_avx2(g + o, O, rows, M, K, std::min(kChunk, K - k0), P + k0);
        }
      }
    }
  }
#endif
  for (; o < o_end; ++o) {
    const scalar_t* wr = w + o * K;
    for (int64_t n = 0; n < M; ++n) {
      const scalar_t gv = g[n * O + o];
      scalar_t* pr = P + n * K;
      for (int64_t k = 0; k < K; ++k) {
        pr[k] += gv * wr[k];
      }
    }
  }
}

template <typename scalar_t>
void input_grad_kernel(const scalar_t* g, const scalar_t* w, int64_t M, int64_t K, int64_t O,
                       scalar_t* partial, int64_t bands) {
  bool simd = false;
#ifdef VIDCONV_LINEAR_AVX2
  simd = std::is_same_v<scalar_t, float> && use_avx2();
#endif
  // Bands of whole 8-row groups, one per task; band b sums into partial[b] (zeroed).
  const int64_t per = ((O + bands - 1) / bands + 7) / 8 * 8;
  at::parallel_for(0, bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = std::min(O, b * per), hi = std::min(O, lo + per);
      input_grad_band(g, w, M, K, O, lo, hi, simd, partial + b * M * K);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> small_batch_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && grad.dim() == 2 &&
                  grad.size(0) == x.size(0) && grad.size(1) == weight.size(0) &&
                  x.size(1) == weight.size(1),
              "small_batch_linear_backward: grad ", grad.sizes(), ", x ", x.sizes(), " and weight ",
              weight.sizes(), " do not fit (M, O), (M, K), (O, K)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && grad.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "small_batch_linear_backward: grad, x and weight must all be float32 or float64");
  const at::Tensor g = grad.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), O = wc.size(0);
  at::Tensor grad_x, grad_w, grad_b;
  if (output_mask[0]) {
    if (M == 0 || K == 0 || O == 0) {
      grad_x = at::zeros({M, K}, x.options());
    } else {
      // At most kMaxBands partials (each M x K, zeroed and summed): with many threads the
      // bands would cost more memory traffic than the split saves.
      constexpr int64_t kMaxBands = 4;
      const int64_t bands = std::max<int64_t>(
          1, std::min<int64_t>({at::get_num_threads(), kMaxBands, (O + 7) / 8}));
      at::Tensor partial = at::zeros({bands, M, K}, x.options());
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_batch_linear_backward", [&] {
        input_grad_kernel<scalar_t>(g.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), M, K, O,
                                    partial.data_ptr<scalar_t>(), bands);
      });
      grad_x = bands == 1 ? partial[0] : partial.sum(0);
    }
  }
  if (output_mask[1]) {
    grad_w = at::empty({O, K}, x.options());
    if (M == 0) {
      grad_w.zero_();
    } else if (O > 0 && K > 0) {
      const at::Tensor gT = g.t().contiguous();
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_batch_linear_backward", [&] {
        weight_grad_kernel<scalar_t>(gT.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), M, K, O,
                                     grad_w.data_ptr<scalar_t>());
      });
    }
  }
  if (output_mask[2]) {
    grad_b = g.sum(0);
  }
  return {grad_x, grad_w, grad_b};
}

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "small_batch_linear: x and weight must be 2-D, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "small_batch_linear: x has ", x.size(1),
              " features, weight expects ", weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "small_batch_linear: x and weight must both be float32 or float64, got ",
              x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(),
              "small_batch_linear: x and weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), O = weight.size(0);
  const at::Tensor* b = bias.has_value() && bias->defined() ? &*bias : nullptr;
  if (b) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == O && b->is_contiguous() &&
                    b->scalar_type() == x.scalar_type(),
                "small_batch_linear: bias must be a contiguous ", x.scalar_type(), " vector of ",
                O, ", got ", b->scalar_type(), " ", b->sizes());
  }
  at::Tensor y = at::empty({M, O}, x.options());
  if (M == 0 || O == 0) {
    return y;
  }
  if (K == 0) {
    return b ? y.copy_(b->unsqueeze(0).expand({M, O})) : y.zero_();
  }
  if (x.scalar_type() == at::kFloat) {
    small_batch_linear_kernel<float>(x.data_ptr<float>(), weight.data_ptr<float>(),
                                     b ? b->data_ptr<float>() : nullptr, M, K, O,
                                     y.data_ptr<float>());
  } else {
    small_batch_linear_kernel<double>(x.data_ptr<double>(), weight.data_ptr<double>(),
                                      b ? b->data_ptr<double>() : nullptr, M, K, O,
                                      y.data_ptr<double>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(vidconv, CPU, m) {
  m.impl("small_batch_linear", &small_batch_linear_cpu);
  m.impl("small_batch_linear_backward", &small_batch_linear_backward_cpu);
}

}  // namespace vidconv
