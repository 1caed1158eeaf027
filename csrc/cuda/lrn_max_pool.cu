// ATen glue of lrn_max_pool on CUDA: checks, device guard, channels_last_3d input, current stream,
// one launch of the runtime-only kernel in lrn_max_pool_kernel.cu, launch check.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "cuda/lrn_max_pool_kernel.h"

namespace vidconv {
namespace {

int64_t pooled_size(int64_t in, int64_t k, bool ceil_mode) {
  return ceil_mode ? (in + k - 1) / k : in / k;
}

at::Tensor lrn_max_pool_cuda(const at::Tensor& x_in, int64_t size, double alpha, double beta,
                             double k, at::IntArrayRef pool, bool ceil_mode) {
  // Python validates with full messages (vidconv/ops/lrn_pool.py); these keep a direct
  // torch.ops call from reaching the kernel with something it cannot read.
  TORCH_CHECK(x_in.is_cuda(), "lrn_max_pool: x must be a CUDA tensor");
  TORCH_CHECK(x_in.dim() == 5, "lrn_max_pool: x must be (N, C, T, H, W), got shape ",
              x_in.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              "lrn_max_pool: x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(size >= 1 && size <= cuda::kLrnPoolMaxSize, "lrn_max_pool: size must be in 1 .. ",
              cuda::kLrnPoolMaxSize, " on CUDA, got ", size);
  TORCH_CHECK(pool.size() == 2 && pool[0] >= 1 && pool[1] >= 1,
              "lrn_max_pool: pool must be two positive ints (kh, kw), got ", pool);
  const int64_t n = x_in.size(0), c = x_in.size(1), t = x_in.size(2), h = x_in.size(3),
                w = x_in.size(4);
  const int64_t ho = pooled_size(h, pool[0], ceil_mode), wo = pooled_size(w, pool[1], ceil_mode);
  TORCH_CHECK(ho >= 1 && wo >= 1, "lrn_max_pool: pool ", pool, " does not fit frames of ", h,
              "x", w, " without ceil_mode");
  TORCH_CHECK(c <= cuda::kLrnPoolMaxChannels, "lrn_max_pool: at most ",
              cuda::kLrnPoolMaxChannels, " channels on CUDA, got ", c);
  TORCH_CHECK(h <= std::numeric_limits<int32_t>::max() && w <= std::numeric_limits<int32_t>::max(),
              "lrn_max_pool: frames must be smaller than 2^31 on each side");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast3d);
  at::Tensor out = at::empty({n, c, t, ho, wo}, x.options(), at::MemoryFormat::ChannelsLast3d);
  if (out.numel() == 0) {
    return out;
  }
  cuda::LrnPoolArgs args{};
  args.x = x.const_data_ptr();
  args.out = out.mutable_data_ptr();
  args.frames = n * t;
  args.c = static_cast<int>(c);
  args.h = static_cast<int>(h);
  args.w = static_cast<int>(w);
  args.ho = static_cast<int>(ho);
  args.wo = static_cast<int>(wo);
  args.kh = static_cast<int>(pool[0]);
  args.kw = static_cast<int>(pool[1]);
  args.size = static_cast<int>(size);
  args.alpha_n = alpha / static_cast<double>(size);
  args.k = k;
  args.beta = beta;
  switch (dtype) {
    case at::kFloat:
      args.type = cuda::LrnPoolType::kFloat32;
      break;
    case at::kHalf:
      args.type = cuda::LrnPoolType::kFloat16;
      break;
    case at::kBFloat16:
      args.type = cuda::LrnPoolType::kBFloat16;
      break;
    default:
      args.type = cuda::LrnPoolType::kFloat64;
      break;
  }
  const char* why =
      cuda::launch_lrn_max_pool(args, at::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(why == nullptr, why, " (x shape ", x_in.sizes(), ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vidconv, CUDA, m) { m.impl("lrn_max_pool", &lrn_max_pool_cuda); }

}  // namespace vidconv
