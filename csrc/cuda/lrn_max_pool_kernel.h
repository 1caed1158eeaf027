// Launcher of the fused LRN + max pooling kernel (lrn_max_pool): CUDA runtime only, no torch
// headers, so the kernel file compiles with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace vidconv {
namespace cuda {

enum class LrnPoolType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct LrnPoolArgs {
  const void* x;      // (N, T, H, W, C) contiguous ("channels_last_3d")
  void* out;          // (N, T, H', W', C) contiguous, x's type
  int64_t frames;     // N * T
  int c, h, w;        // channels and frame size
  int ho, wo;         // output frame size: ceil or floor of h / kh, w / kw
  int kh, kw;         // pool window = stride
  int size;           // LRN window along channels, >= 1
  double alpha_n;     // alpha / size
  double k;
  double beta;
  LrnPoolType type;
};

// Largest LRN window and channel count the launcher takes (the channel vector of one output
// position, padded by the window, lives in shared memory).
constexpr int kLrnPoolMaxSize = 64;
constexpr int kLrnPoolMaxChannels = 2048;

// Enqueues one launch on `stream`. Returns nullptr, or why the arguments cannot be run (sizes
// out of range), in which case nothing is launched. Launch errors are left for the caller to
// collect (cudaGetLastError).
const char* launch_lrn_max_pool(const LrnPoolArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace vidconv
