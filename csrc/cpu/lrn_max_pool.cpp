// CPU kernel of lrn_max_pool: local response normalisation across channels, then max pooling
// over non-overlapping (kh, kw) windows of each frame, writing only the pooled output.
//
// Work is split over output rows (n, t, i): a row reads its kh input rows of every channel once,
// normalises them in a small per-thread buffer and keeps the running maximum, so the normalised
// activations never reach memory. Two layouts:
//   - channels_last_3d (N, T, H, W, C): per input pixel, the C channels are contiguous; squares go
//     into a zero-padded buffer and the window sums are `size` shifted vector adds over c.
//   - contiguous (N, C, T, H, W): per input row, each channel's W pixels are contiguous; squares of
//     all channels go into a (C + size - 1) x W buffer and the window sums run over w.
// Accumulation in float (double for float64): one rounding to the output type at the end, which
// commutes with the max (rounding is monotone).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace vidconv {
namespace {

struct LrnPoolGeometry {
  int64_t n, c, t, h, w;  // input sizes
  int64_t ho, wo;         // output sizes
  int64_t kh, kw;         // pool window (= stride)
  int64_t size;           // LRN window along channels
};

// sqrt never sets errno for our arguments (k + alpha/size * sum of squares); without the errno
// path GCC can vectorise it (sqrtps), which is most of this kernel's arithmetic.
#if defined(__GNUC__) && !defined(__clang__)
#define LRN_POOL_VECTOR_MATH __attribute__((optimize("no-math-errno")))
#else
#define LRN_POOL_VECTOR_MATH
#endif

// x^(-beta) for the LRN denominator; beta = 0.5 (the paper's) is one sqrt and a division.
template <typename acc_t>
struct InvPow {
  acc_t beta;
  bool half;
};

// y[i] = x[i] * (k + alpha_n * y[i])^-beta for i < n: y holds the window sums on entry.
template <typename scalar_t, typename acc_t>
LRN_POOL_VECTOR_MATH void normalize(const scalar_t* x, acc_t* y, int64_t n, acc_t alpha_n,
                                    acc_t k, InvPow<acc_t> inv_pow) {
  if (inv_pow.half) {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = static_cast<acc_t>(x[i]) / std::sqrt(k + alpha_n * y[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = static_cast<acc_t>(x[i]) * std::pow(k + alpha_n * y[i], -inv_pow.beta);
    }
  }
}

// Max that propagates NaN, as max_pool3d does.
template <typename acc_t>
inline acc_t nan_max(acc_t best, acc_t v) {
  return (v > best || std::isnan(v)) ? v : best;
}

int64_t pooled_size(int64_t in, int64_t k, bool ceil_mode) {
  // Non-overlapping windows and no padding: every ceil-mode window starts inside the input.
  return ceil_mode ? (in + k - 1) / k : in / k;
}

template <typename scalar_t, typename acc_t>
void lrn_max_pool_channels_last(const scalar_t* x, scalar_t* out, const LrnPoolGeometry& g,
                                acc_t alpha_n, acc_t k, InvPow<acc_t> inv_pow) {
  const int64_t C = g.c, lo = g.size / 2, hi = (g.size - 1) / 2;
  at::parallel_for(0, g.n * g.t * g.ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sq(C + lo + hi, acc_t(0)), best(C), y(C);
    acc_t* sq_c = sq.data() + lo;  // sq_c[c] = x[c]^2, zero for c < 0 and c >= C
    for (int64_t r = begin; r < end; ++r) {
      const int64_t nt = r / g.ho, i = r % g.ho;
      const int64_t h0 = i * g.kh, h1 = std::min(h0 + g.kh, g.h);
      for (int64_t j = 0; j < g.wo; ++j) {
        const int64_t w0 = j * g.kw, w1 = std::min(w0 + g.kw, g.w);
        std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            const scalar_t* px = x + ((nt * g.h + h) * g.w + w) * C;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t v = static_cast<acc_t>(px[c]);
              sq_c[c] = v * v;
            }
            std::fill(y.begin(), y.end(), acc_t(0));
            for (int64_t q = -lo; q <= hi; ++q) {
              const acc_t* src = sq_c + q;
              for (int64_t c = 0; c < C; ++c) y[c] += src[c];
            }
            normalize(px, y.data(), C, alpha_n, k, inv_pow);
            for (int64_t c = 0; c < C; ++c) best[c] = nan_max(best[c], y[c]);
          }
        }
        scalar_t* po = out + ((nt * g.ho + i) * g.wo + j) * C;
        for (int64_t c = 0; c < C; ++c) po[c] = static_cast<scalar_t>(best[c]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void lrn_max_pool_contiguous(const scalar_t* x, scalar_t* out, const LrnPoolGeometry& g,
                             acc_t alpha_n, acc_t k, InvPow<acc_t> inv_pow) {
  const int64_t C = g.c, W = g.w, lo = g.size / 2, hi = (g.size - 1) / 2;
  const int64_t plane = g.t * g.h * W, out_plane = g.t * g.ho * g.wo;
  at::parallel_for(0, g.n * g.t * g.ho, 1, [&](int64_t begin, int64_t end) {
    // sq[(lo + c) * W + w] = x[c, w]^2 of the current input row; rows -lo.. and C.. stay zero.
    std::vector<acc_t> sq((C + lo + hi) * W, acc_t(0)), s(W), best(C * g.wo);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (g.t * g.ho), t = (r / g.ho) % g.t, i = r % g.ho;
      const int64_t h0 = i * g.kh, h1 = std::min(h0 + g.kh, g.h);
      std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
      for (int64_t h = h0; h < h1; ++h) {
        const scalar_t* row = x + n * C * plane + (t * g.h + h) * W;  // channel 0's row
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* px = row + c * plane;
          acc_t* dst = sq.data() + (lo + c) * W;
          for (int64_t w = 0; w < W; ++w) {
            const acc_t v = static_cast<acc_t>(px[w]);
            dst[w] = v * v;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          std::fill(s.begin(), s.end(), acc_t(0));
          for (int64_t q = 0; q < g.size; ++q) {
            const acc_t* src = sq.data() + (c + q) * W;
            for (int64_t w = 0; w < W; ++w) s[w] += src[w];
          }
          const scalar_t* px = row + c * plane;
          normalize(px, s.data(), W, alpha_n, k, inv_pow);
          acc_t* b = best.data() + c * g.wo;
          for (int64_t j = 0; j < g.wo; ++j) {
            const int64_t w1 = std::min((j + 1) * g.kw, W);
            for (int64_t w = j * g.kw; w < w1; ++w) b[j] = nan_max(b[j], s[w]);
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* po = out + n * C * out_plane + c * out_plane + (t * g.ho + i) * g.wo;
        const acc_t* b = best.data() + c * g.wo;
        for (int64_t j = 0; j < g.wo; ++j) po[j] = static_cast<scalar_t>(b[j]);
      }
    }
  });
}

at::Tensor lrn_max_pool_cpu(const at::Tensor& x_in, int64_t size, double alpha, double beta,
                            double k, at::IntArrayRef pool, bool ceil_mode) {
  // Python validates with full messages (vidconv/ops/lrn_pool.py); these keep a direct
  // torch.ops call from reaching the loops with something they cannot read.
  TORCH_CHECK(x_in.dim() == 5, "lrn_max_pool: x must be (N, C, T, H, W), got shape ",
              x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()),
              "lrn_max_pool: x must be floating point, got ", x_in.scalar_type());
  TORCH_CHECK(size >= 1, "lrn_max_pool: size must be >= 1, got ", size);
  TORCH_CHECK(pool.size() == 2 && pool[0] >= 1 && pool[1] >= 1,
              "lrn_max_pool: pool must be two positive ints (kh, kw), got ", pool);
  const bool channels_last =
      !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  LrnPoolGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), 0, 0,
                    pool[0],   pool[1],   size};
  g.ho = pooled_size(g.h, g.kh, ceil_mode);
  g.wo = pooled_size(g.w, g.kw, ceil_mode);
  TORCH_CHECK(g.ho >= 1 && g.wo >= 1, "lrn_max_pool: pool ", pool, " does not fit frames of ",
              g.h, "x", g.w, " without ceil_mode");
  at::Tensor out = at::empty({g.n, g.c, g.t, g.ho, g.wo}, x.options(),
                             channels_last ? at::MemoryFormat::ChannelsLast3d
                                           : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_max_pool", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t alpha_n = static_cast<acc_t>(alpha / static_cast<double>(size));
    const InvPow<acc_t> inv_pow{static_cast<acc_t>(beta), beta == 0.5};
    if (channels_last) {
      lrn_max_pool_channels_last<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(),
                                                  out.mutable_data_ptr<scalar_t>(), g, alpha_n,
                                                  static_cast<acc_t>(k), inv_pow);
    } else {
      lrn_max_pool_contiguous<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(),
                                               out.mutable_data_ptr<scalar_t>(), g, alpha_n,
                                               static_cast<acc_t>(k), inv_pow);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vidconv, CPU, m) { m.impl("lrn_max_pool", &lrn_max_pool_cpu); }

}  // namespace vidconv
