// Every vidconv op's schema, in one place. Kernels register themselves per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd live in vidconv/ops/.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef VIDCONV_WITH_CUDA
#include <cuda.h>

#include "cuda/st_conv3d_kernel.h"
#include "cuda/st_conv3d_sm90_kernel.h"
#endif

#ifndef VIDCONV_ARCHS
#define VIDCONV_ARCHS ""
#endif

TORCH_LIBRARY(vidconv, m) {
  // uint8 clips (N, T, H, W, C) -> fovea and context streams, each (N, C, T, S, S).
  // offsets: int64 (N, 2) top-left (y, x) of the fovea; flip: bool (N,).
  m.def(
      "fovea_context(Tensor clips, int size, Tensor offsets, Tensor flip, float[] mean, "
      "float[] std, ScalarType dtype, bool channels_last) -> (Tensor, Tensor)");
  // uint8 clips (N, T, H, W, C) -> one S x S crop per clip, (N, C, T, S, S).
  m.def(
      "crop_normalize(Tensor clips, int size, Tensor offsets, Tensor flip, float[] mean, "
      "float[] std, ScalarType dtype, bool channels_last) -> Tensor");
  // Both into the caller's tensors, whose dtype and layout (contiguous or channels_last_3d)
  // they take.
  m.def(
      "fovea_context.out(Tensor clips, int size, Tensor offsets, Tensor flip, float[] mean, "
      "float[] std, *, Tensor(a!) fovea, Tensor(b!) context) -> ()");
  m.def(
      "crop_normalize.out(Tensor clips, int size, Tensor offsets, Tensor flip, float[] mean, "
      "float[] std, *, Tensor(a!) out) -> ()");
  // conv3d + bias + optional ReLU. x (N, C, T, H, W), weight (K, C, kt, kh, kw). Its CPU and
  // CUDA kernels are registered from Python (vidconv/ops/st_conv.py): per layer shape they run
  // the fastest candidate that agrees with the reference (vidconv/ops/conv_planner.py).
  m.def(
      "st_conv3d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "bool relu) -> Tensor");
  // Gradients of st_conv3d; `out` is the forward output (for the ReLU mask).
  // output_mask selects (grad_x, grad_weight, grad_bias); unselected ones come back empty.
  m.def(
      "st_conv3d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, int[] stride, "
      "int[] padding, bool relu, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The hand-written implicit-GEMM forward (CUDA only; float32/float16/bfloat16) with block tile
  // `tile_config` (see vidconv._C.fused_tile_configs()); output (N, K, T', H', W') in
  // channels_last_3d memory. One of st_conv3d's candidates.
  m.def(
      "st_conv3d_fused(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "bool relu, int tile_config) -> Tensor");
  // The Hopper implicit-GEMM forward (wgmma; CUDA only, float16/bfloat16, a compute capability
  // 9.0 device and an extension built for 9.0a), same layouts as st_conv3d_fused, one block tile
  // (vidconv._C.fused_sm90_tile()). split_k: reduction slices per tile (split-K, for layers with
  // fewer tiles than SMs), 1 = none, 0 = chosen from the tile and SM counts; at most 16 and the
  // reduction's 64-wide tiles. One of st_conv3d's candidates (per split factor).
  m.def(
      "st_conv3d_fused_sm90(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "bool relu, int split_k=1) -> Tensor");
  // Two st_conv3d_fused_sm90 problems of identical sizes, each its own x, weight and bias (the
  // multires fovea and context streams), in one launch whose work units span both. Not yet a
  // candidate of st_conv3d's dispatch (which decides per layer, one problem at a time): the
  // tests and the sanitizer workload call it.
  m.def(
      "st_conv3d_fused_sm90_grouped(Tensor x0, Tensor weight0, Tensor? bias0, Tensor x1, "
      "Tensor weight1, Tensor? bias1, int[] stride, int[] padding, bool relu, int split_k=1) "
      "-> (Tensor, Tensor)");

  // x (M, K) @ weight (O, K)^T + bias for few rows M (an FC layer's batch), streaming the weight
  // matrix once (CPU; float32, float64; contiguous). One of vidconv.ops.linear's candidates.
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Its gradients (grad_x = grad @ weight, grad_weight = grad^T @ x, grad_bias = grad summed over
  // rows), selected by output_mask; unselected ones come back undefined.
  m.def(
      "small_batch_linear_backward(Tensor grad, Tensor x, Tensor weight, bool[3] output_mask) -> "
      "(Tensor, Tensor, Tensor)");

  // ---- lrn_max_pool (conv1/conv2's "N" then "P", fused) ----
  // Local response normalisation across channels (torch's: x / (k + alpha/size * sum x^2)^beta
  // over the `size` channels centred on x's), then max pooling frame by frame over
  // non-overlapping pool = (kh, kw) windows (stride = window, no padding; ceil_mode keeps a
  // partial border window). x (N, C, T, H, W) -> (N, C, T, H', W'), only the pooled output is
  // written. Floating point; contiguous or channels_last_3d (the output follows x on the CPU
  // and is channels_last_3d on CUDA).
  m.def(
      "lrn_max_pool(Tensor x, int size, float alpha, float beta, float k, int[2] pool, "
      "bool ceil_mode) -> Tensor");
  // Gradient of lrn_max_pool with respect to x (recomputed through LRN and max pooling).
  m.def(
      "lrn_max_pool_backward(Tensor grad_out, Tensor x, int size, float alpha, float beta, "
      "float k, int[2] pool, bool ceil_mode) -> Tensor");
  // ---- end lrn_max_pool ----
}

namespace {

pybind11::object cuda_version() {
#ifdef VIDCONV_WITH_CUDA
  return pybind11::int_(CUDA_VERSION);
#else
  return pybind11::none();
#endif
}

// dtype name -> the fused kernel's tile names, index = tile_config; empty for a CPU-only build.
pybind11::dict fused_tile_configs() {
  pybind11::dict out;
#ifdef VIDCONV_WITH_CUDA
  using vidconv::cuda::ConvType;
  for (auto [name, type] : {std::pair{"float32", ConvType::kFloat32},
                            std::pair{"float16", ConvType::kFloat16},
                            std::pair{"bfloat16", ConvType::kBFloat16}}) {
    pybind11::list tiles;
    for (int i = 0; i < vidconv::cuda::tile_config_count(type); ++i) {
      tiles.append(vidconv::cuda::tile_config_name(type, i));
    }
    out[name] = tiles;
  }
#endif
  return out;
}

// The Hopper kernel's tile name, or None for a CPU-only build.
pybind11::object fused_sm90_tile() {
#ifdef VIDCONV_WITH_CUDA
  return pybind11::str(vidconv::cuda::sm90_tile_name());
#else
  return pybind11::none();
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vidconv C++/CUDA kernels; the ops are reached through torch.ops.vidconv";
  m.def("cuda_version", &cuda_version,
        "CUDA version the kernels were built with (e.g. 13000), or None for a CPU-only build");
  m.attr("cuda_archs") = VIDCONV_ARCHS;
  m.def("fused_tile_configs", &fused_tile_configs,
        "dtype name -> tile names of st_conv3d_fused (index = tile_config); {} without CUDA");
  m.def("fused_sm90_tile", &fused_sm90_tile,
        "block tile of st_conv3d_fused_sm90 (e.g. '128x128x64'), or None without CUDA");
}
