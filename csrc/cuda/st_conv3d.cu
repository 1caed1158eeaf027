// ATen glue of st_conv3d_fused on CUDA: checks, device guard, current stream, the one-time
// conversion of x to NTHWC (channels_last_3d) and the weight repack to (K, kt, kh, kw, C), one
// launch of the runtime-only implicit-GEMM kernel in st_conv3d_kernel.cu with the requested tile
// configuration, launch check; and the same for st_conv3d_fused_sm90, the Hopper (wgmma) kernel
// in st_conv3d_sm90_kernel.cu.
//
// This is one candidate of vidconv::st_conv3d, whose CPU and CUDA kernels are registered from
// Python (vidconv/ops/st_conv.py): they time this kernel's tiles beside cuDNN's algorithms per
// layer and call the fastest correct one (vidconv/ops/conv_planner.py). The backward candidates are
// all ATen's, so there is no backward here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda/st_conv3d_kernel.h"
#include "cuda/st_conv3d_sm90_kernel.h"

namespace vidconv {
namespace {

int64_t out_size(int64_t size, int64_t k, int64_t s, int64_t p) { return (size + 2 * p - k) / s + 1; }

// Python validates with full messages (vidconv/ops/st_conv.py); these cheap re-checks keep a
// direct torch.ops call from reaching the kernel with something it cannot read.
void check_inputs(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding) {
  TORCH_CHECK(x.is_cuda() && weight.is_cuda(), "st_conv3d: x and weight must be CUDA tensors");
  TORCH_CHECK(x.dim() == 5, "st_conv3d: x must be (N, C, T, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 5, "st_conv3d: weight must be (K, C, kt, kh, kw), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "st_conv3d: weight has ", weight.size(1),
              " input channels but x has ", x.size(1));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "st_conv3d: weight must have x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "st_conv3d: weight must be on x's device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0),
                "st_conv3d: bias must be (", weight.size(0), ",) on x's device, got ",
                bias->sizes(), " on ", bias->device());
  }
  TORCH_CHECK(stride.size() == 3 && padding.size() == 3,
              "st_conv3d: stride and padding must have 3 entries");
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(stride[i] >= 1 && padding[i] >= 0, "st_conv3d: need stride >= 1, padding >= 0");
    TORCH_CHECK(out_size(x.size(2 + i), weight.size(2 + i), stride[i], padding[i]) >= 1,
                "st_conv3d: kernel ", weight.sizes(), " does not fit x ", x.sizes(),
                " with padding ", padding);
  }
}

// cp.async reads 16-byte vectors: a view at an odd storage offset is copied to a fresh
// (allocator-aligned) buffer.
at::Tensor aligned16(at::Tensor v) {
  if (reinterpret_cast<uintptr_t>(v.data_ptr()) % 16 != 0) {
    v = v.clone(at::MemoryFormat::Contiguous);
  }
  return v;
}

// x as a contiguous (N, T, H, W, Cp) view or copy, Cp = C rounded up to `mult` (zero channels).
// A channels_last_3d input is read in place; a contiguous (NCDHW) one is converted once.
at::Tensor input_nthwc(const at::Tensor& x, int64_t cp) {
  const int64_t c = x.size(1);
  if (cp == c) {
    return aligned16(x.contiguous(at::MemoryFormat::ChannelsLast3d).permute({0, 2, 3, 4, 1}));
  }
  at::Tensor padded = at::zeros({x.size(0), x.size(2), x.size(3), x.size(4), cp}, x.options());
  padded.narrow(4, 0, c).copy_(x.permute({0, 2, 3, 4, 1}));
  return padded;
}

// weight (K, C, kt, kh, kw) -> contiguous (K, kt, kh, kw, Cp), the reduction order of the kernel.
at::Tensor weight_repacked(const at::Tensor& weight, int64_t cp) {
  const int64_t c = weight.size(1);
  if (cp == c) {
    return aligned16(weight.permute({0, 2, 3, 4, 1}).contiguous());
  }
  at::Tensor padded = at::zeros(
      {weight.size(0), weight.size(2), weight.size(3), weight.size(4), cp}, weight.options());
  padded.narrow(4, 0, c).copy_(weight.permute({0, 2, 3, 4, 1}));
  return padded;
}

cuda::ConvType conv_type(at::ScalarType dtype) {
  return dtype == at::kFloat ? cuda::ConvType::kFloat32
         : dtype == at::kHalf ? cuda::ConvType::kFloat16
                              : cuda::ConvType::kBFloat16;
}

// What both hand-written kernels share: output allocation, the empty-reduction case, the size
// limits, x to NTHWC and the weight repack (C padded to the kernel's vector width), the float32
// bias, then launch(args, type, stream) on the current stream and the launch check.
template <class Launch>
at::Tensor run_fused(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, bool relu, cuda::ConvType type, Launch&& launch) {
  const int64_t n = x.size(0), c = x.size(1), t = x.size(2), h = x.size(3), w = x.size(4);
  const int64_t k = weight.size(0), kt = weight.size(2), kh = weight.size(3), kw = weight.size(4);
  const int64_t to = out_size(t, kt, stride[0], padding[0]);
  const int64_t ho = out_size(h, kh, stride[1], padding[1]);
  const int64_t wo = out_size(w, kw, stride[2], padding[2]);
  at::Tensor out = at::empty({n, k, to, ho, wo}, x.options(), at::MemoryFormat::ChannelsLast3d);
  if (out.numel() == 0) {
    return out;
  }
  if (c == 0) {
    // An empty reduction: the output is the (activated) bias.
    out.zero_();
    if (bias.has_value()) {
      out.add_(bias->view({1, k, 1, 1, 1}));
    }
    return relu ? out.relu_() : out;
  }

  const int64_t mult = cuda::channel_multiple(type);
  const int64_t cp = (c + mult - 1) / mult * mult;
  TORCH_CHECK(t * h * w * cp <= cuda::kMaxIndex && kt * kh * kw * cp <= cuda::kMaxIndex &&
                  n * to * ho * wo <= cuda::kMaxIndex && (n * to * ho * wo / 64 + 1) * k <=
                  cuda::kMaxIndex,
              "st_conv3d: sizes too large for one launch (x ", x.sizes(), ", weight ",
              weight.sizes(), "): per-clip, reduction and output-position counts must be < 2^31");

  const at::Tensor xin = input_nthwc(x, cp);
  const at::Tensor win = weight_repacked(weight, cp);
  at::Tensor bias_f;
  if (bias.has_value()) {
    bias_f = bias->to(at::kFloat).contiguous();
  }

  cuda::StConvArgs args{};
  args.input = xin.data_ptr();
  args.weight = win.data_ptr();
  args.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  args.out = out.data_ptr();
  args.n = static_cast<int>(n);
  args.c = static_cast<int>(cp);
  args.t = static_cast<int>(t);
  args.h = static_cast<int>(h);
  args.w = static_cast<int>(w);
  args.k = static_cast<int>(k);
  args.kt = static_cast<int>(kt);
  args.kh = static_cast<int>(kh);
  args.kw = static_cast<int>(kw);
  args.st = static_cast<int>(stride[0]);
  args.sh = static_cast<int>(stride[1]);
  args.sw = static_cast<int>(stride[2]);
  args.pt = static_cast<int>(padding[0]);
  args.ph = static_cast<int>(padding[1]);
  args.pw = static_cast<int>(padding[2]);
  args.to = static_cast<int>(to);
  args.ho = static_cast<int>(ho);
  args.wo = static_cast<int>(wo);
  args.relu = relu;
  launch(args, type, at::cuda::getCurrentCUDAStream(x.get_device()).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}


at::Tensor st_conv3d_fused_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, bool relu, int64_t tile_config) {
  check_inputs(x, weight, bias, stride, padding);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "st_conv3d_fused: x must be float32, float16 or bfloat16 (float64 has no fused "
              "kernel), got ", dtype);
  const cuda::ConvType type = conv_type(dtype);
  TORCH_CHECK(tile_config >= 0 && tile_config < cuda::tile_config_count(type),
              "st_conv3d_fused: tile_config must be in [0, ", cuda::tile_config_count(type),
              ") for ", dtype, ", got ", tile_config);
  return run_fused(x, weight, bias, stride, padding, relu, type,
                   [&](const cuda::StConvArgs& args, cuda::ConvType t, cudaStream_t stream) {
                     cuda::launch_st_conv3d(args, t, static_cast<int>(tile_config), stream);
                   });
}

// The Hopper kernel (st_conv3d_sm90_kernel.cu) on args[0 .. count): one problem, or the two of a
// grouped launch. Picks the split factor when split_k is 0, allocates the packed weights and the
// split-K workspace (stream-ordered: the allocator reuses them only after the launch); the
// launcher answers why it cannot run (not built for sm_90a, not a 9.0 device, shape) before
// launching anything, and that becomes the error.
void launch_sm90(const char* op, const cuda::StConvArgs* args, int count, cuda::ConvType type,
                 int64_t split_k, const at::Tensor& x, const at::Tensor& weight,
                 cudaStream_t stream) {
  int split = static_cast<int>(split_k);
  if (split == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
    // A grouped launch's problems share the SMs: each has its share to fill.
    split = cuda::sm90_choose_split(args[0], std::max(1, sms / count));
  }
  TORCH_CHECK(cuda::sm90_check_split(args[0], split) == cuda::kSm90Ok, op,
              ": split_k must be at most the reduction's ", cuda::sm90_reduction_tiles(args[0]),
              " 64-wide tiles (kt*kh*kw*C/64, C padded to 8) for weight ", weight.sizes(),
              ", got ", split);
  std::vector<at::Tensor> packed;
  void* packed_ptrs[2] = {nullptr, nullptr};
  for (int g = 0; g < count; ++g) {
    packed.push_back(
        at::empty({cuda::sm90_packed_weight_bytes(args[g])}, x.options().dtype(at::kByte)));
    packed_ptrs[g] = packed.back().data_ptr();
  }
  const long long ws_bytes = cuda::sm90_workspace_bytes(args[0], split, count);
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  }
  const int status = cuda::launch_st_conv3d_sm90_grouped(
      args, count, type, packed_ptrs, split,
      workspace.defined() ? workspace.data_ptr() : nullptr, stream);
  TORCH_CHECK(status == cuda::kSm90Ok, op, ": ", cuda::sm90_status_message(status), " (x ",
              x.sizes(), ", weight ", weight.sizes(), ", split_k ", split, ", device ",
              x.device(), ")");
}

void check_sm90_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, int64_t split_k) {
  check_inputs(x, weight, bias, stride, padding);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(split_k >= 0 && split_k <= 16, op,
              ": split_k must be 0 (automatic) or in [1, 16], got ", split_k);
}

at::Tensor st_conv3d_fused_sm90_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     at::IntArrayRef stride, at::IntArrayRef padding, bool relu,
                                     int64_t split_k) {
  constexpr const char* op = "st_conv3d_fused_sm90";
  check_sm90_inputs(op, x, weight, bias, stride, padding, split_k);
  const c10::cuda::CUDAGuard guard(x.device());
  return run_fused(x, weight, bias, stride, padding, relu, conv_type(x.scalar_type()),
                   [&](const cuda::StConvArgs& args, cuda::ConvType t, cudaStream_t stream) {
                     launch_sm90(op, &args, 1, t, split_k, x, weight, stream);
                   });
}

// Two problems of identical sizes (the multires fovea and context streams), their own tensors,
// in one launch whose work units span both.
std::tuple<at::Tensor, at::Tensor> st_conv3d_fused_sm90_grouped_cuda(
    const at::Tensor& x0, const at::Tensor& weight0, const std::optional<at::Tensor>& bias0,
    const at::Tensor& x1, const at::Tensor& weight1, const std::optional<at::Tensor>& bias1,
    at::IntArrayRef stride, at::IntArrayRef padding, bool relu, int64_t split_k) {
  constexpr const char* op = "st_conv3d_fused_sm90_grouped";
  check_sm90_inputs(op, x0, weight0, bias0, stride, padding, split_k);
  check_sm90_inputs(op, x1, weight1, bias1, stride, padding, split_k);
  TORCH_CHECK(x1.sizes() == x0.sizes() && weight1.sizes() == weight0.sizes(), op,
              ": both problems must have the same sizes, got x0 ", x0.sizes(), ", x1 ",
              x1.sizes(), ", weight0 ", weight0.sizes(), ", weight1 ", weight1.sizes());
  TORCH_CHECK(x1.scalar_type() == x0.scalar_type() && x1.device() == x0.device(), op,
              ": x1 must have x0's dtype and device, got ", x1.scalar_type(), " on ",
              x1.device(), " and ", x0.scalar_type(), " on ", x0.device());
  const c10::cuda::CUDAGuard guard(x0.device());
  const cuda::ConvType type = conv_type(x0.scalar_type());
  at::Tensor out1;
  at::Tensor out0 = run_fused(
      x0, weight0, bias0, stride, padding, relu, type,
      [&](const cuda::StConvArgs& args0, cuda::ConvType t, cudaStream_t) {
        // Problem 1 prepared the same way; its launch is the grouped one.
        out1 = run_fused(x1, weight1, bias1, stride, padding, relu, t,
                         [&](const cuda::StConvArgs& args1, cuda::ConvType t1,
                             cudaStream_t stream) {
                           const cuda::StConvArgs both[2] = {args0, args1};
                           launch_sm90(op, both, 2, t1, split_k, x0, weight0, stream);
                         });
      });
  if (!out1.defined()) {
    // No launch (an empty output or reduction): problem 1 the same way on its own.
    out1 = st_conv3d_fused_sm90_cuda(x1, weight1, bias1, stride, padding, relu, split_k);
  }
  return {out0, out1};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidconv, CUDA, m) {
  m.impl("st_conv3d_fused", &st_conv3d_fused_cuda);
  m.impl("st_conv3d_fused_sm90", &st_conv3d_fused_sm90_cuda);
  m.impl("st_conv3d_fused_sm90_grouped", &st_conv3d_fused_sm90_grouped_cuda);
}

}  // namespace vidconv
