// Launcher of the fused spatio-temporal convolution (implicit GEMM conv3d + bias + ReLU):
// CUDA runtime only, no torch headers, so the kernel file compiles with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace vidconv {
namespace cuda {

enum class ConvType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct StConvArgs {
  const void* input;   // (N, T, H, W, C) contiguous ("channels_last_3d"), 16-byte aligned
  const void* weight;  // (K, kt, kh, kw, C) contiguous, 16-byte aligned
  const float* bias;   // (K,) float32, or nullptr
  void* out;           // (N, T', H', W', K) contiguous, in the input's type
  int n, c, t, h, w;   // input sizes; c a multiple of channel_multiple(type)
  int k;               // filters
  int kt, kh, kw;      // kernel extents, each >= 1
  int st, sh, sw;      // strides, each >= 1
  int pt, ph, pw;      // zero padding, each >= 0
  int to, ho, wo;      // output sizes, each >= 1
  bool relu;
};

// The kernel reads 16-byte vectors along C, so C must be a multiple of 16 / sizeof(element):
// 8 for float16/bfloat16, 4 for float32. The caller pads C with zero channels (x and weight).
int channel_multiple(ConvType type);

// Largest sizes one launch takes: the per-image offset T*H*W*C and the reduction
// kt*kh*kw*C are computed in 32 bits (the image base in 64 bits), as is N*T'*H'*W'.
constexpr int64_t kMaxIndex = (int64_t{1} << 31) - 1;

// The kernel is compiled for several block tiles per type (e.g. "128x64x32": output positions x
// filters x reduction); tile_config indexes them, 0 .. tile_config_count(type) - 1.
int tile_config_count(ConvType type);
// The tile's name, or nullptr for an index out of range.
const char* tile_config_name(ConvType type, int tile_config);

// Enqueues one kernel launch on `stream` writing out, with block tile `tile_config` (in range).
// All sizes must be positive and within kMaxIndex. Launch errors are left for the caller to
// collect (cudaGetLastError).
void launch_st_conv3d(const StConvArgs& args, ConvType type, int tile_config,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace vidconv
