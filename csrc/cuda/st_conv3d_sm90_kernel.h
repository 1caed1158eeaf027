// Launcher of the Hopper (sm_90a) fused spatio-temporal convolution: implicit GEMM on wgmma with a
// warp-specialised mbarrier pipeline. CUDA runtime only, no torch headers, so the kernel file
// compiles with plain nvcc. It takes the same arguments as launch_st_conv3d (st_conv3d_kernel.h).
#pragma once

#include <cuda_runtime.h>

#include "cuda/st_conv3d_kernel.h"

namespace vidconv {
namespace cuda {

// What launch_st_conv3d_sm90 can answer besides kSm90Ok; the glue turns each into an error
// naming the reason (sm90_status_message).
enum Sm90Status : int {
  kSm90Ok = 0,
  kSm90NotBuilt = 1,          // the extension holds no sm_90a code for this kernel
  kSm90WrongDevice = 2,       // the current device is not compute capability 9.0
  kSm90UnsupportedType = 3,   // float32: the kernel is float16/bfloat16 only
  kSm90UnsupportedShape = 4,  // a kernel extent >= 256, or the reduction's tap table too large
  kSm90LaunchFailed = 5,      // a CUDA runtime call failed (cudaGetLastError has it)
};

// One human-readable sentence per status.
const char* sm90_status_message(int status);

// The name of the kernel's one block tile, as the plan reports it ("128x128x64").
const char* sm90_tile_name();

// Whether `args` is within what the kernel takes (see kSm90UnsupportedShape); kSm90Ok if so.
int sm90_check_shape(const StConvArgs& args, ConvType type);

// Bytes of device scratch launch_st_conv3d_sm90 needs for the repacked weight.
long long sm90_packed_weight_bytes(const StConvArgs& args);

// Enqueues, on `stream`, the weight repack into `packed_weight` (sm90_packed_weight_bytes(args)
// bytes of device memory, 16-byte aligned, free until the launch completes) and one persistent
// launch writing out (same contract as launch_st_conv3d: NTHWC input, (K, kt, kh, kw, C) weight,
// C a multiple of 8, sizes within kMaxIndex); or returns a status saying why it cannot run here
// without enqueuing anything.
int launch_st_conv3d_sm90(const StConvArgs& args, ConvType type, void* packed_weight,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace vidconv
