// Launcher of the fused preprocessing kernel (fovea_context and crop_normalize): CUDA runtime
// only, no torch headers, so the kernel file compiles with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace vidconv {
namespace cuda {

enum class OutType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct PreprocessArgs {
  const uint8_t* clips;    // (N, T, H, W, 3) uint8, contiguous
  int64_t n, t;            // clips and frames per clip
  int h, w;                // frame size; h * w * 3 < 2^31
  int size;                // output side S, 1 <= S <= min(h, w, kMaxSize)
  const int64_t* offsets;  // (N, 2) fovea top-left (y, x), device memory; clamped to the frame
  const bool* flip;        // (N,) mirror left-right, device memory
  float mean[3];           // per channel, as float
  float inv_std[3];        // 1.0f / float(std), per channel
  void* fovea;             // (N, 3, T, S, S) in out_type
  void* context;           // same, or nullptr for crop_normalize (fovea path alone)
  OutType out_type;
  bool channels_last;      // outputs in channels_last_3d memory, (N, T, S, S, 3)
};

// Largest output side the launcher takes (its bin tables live in shared memory).
constexpr int kMaxSize = 4096;

// Largest sum a context bin may reach (the kernel sums in 32 bits): 255 * bin area.
constexpr int64_t kMaxBinSum = 0xFFFFFFFFLL;

// Enqueues one kernel launch on `stream` writing fovea (and context when non-null). N * T must
// be positive. Launch errors are left for the caller to collect (cudaGetLastError).
void launch_fovea_context(const PreprocessArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace vidconv
