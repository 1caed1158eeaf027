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
  kSm90BadSplit = 6,          // split_k outside [1, min(16, reduction tiles)]
  kSm90GroupMismatch = 7,     // a grouped launch's problems differ in size (or are not 1 or 2)
};

// One human-readable sentence per status.
const char* sm90_status_message(int status);

// The name of the kernel's one block tile, as the plan reports it ("128x128x64").
const char* sm90_tile_name();

// Whether `args` is within what the kernel takes (see kSm90UnsupportedShape); kSm90Ok if so.
int sm90_check_shape(const StConvArgs& args, ConvType type);

// Bytes of device scratch launch_st_conv3d_sm90 needs for the repacked weight.
long long sm90_packed_weight_bytes(const StConvArgs& args);

// 64-wide reduction tiles of the GEMM (kt*kh*kw*C/64 rounded up): split_k is at most this.
int sm90_reduction_tiles(const StConvArgs& args);

// Whether split_k is one the launcher takes for `args` (kSm90Ok) or not (kSm90BadSplit).
int sm90_check_split(const StConvArgs& args, int split_k);

// The split factor the host picks for a device with `sms` SMs: doubles from 1 while the 128x128
// tiles leave SMs idle, up to 16, keeping at least 4 reduction tiles (the pipeline depth) per
// slice.
int sm90_choose_split(const StConvArgs& args, int sms);

// Bytes of device workspace a launch of `groups` problems (1 or 2) with `split_k` needs (0 for
// split_k = 1): the fp32 partial tiles, then one 32-bit counter per tile.
long long sm90_workspace_bytes(const StConvArgs& args, int split_k, int groups = 1);

// Whether args[0 .. count) can share one grouped launch (kSm90Ok): 1 or 2 problems whose sizes,
// strides, padding and activation agree (their tensors are their own).
int sm90_check_group(const StConvArgs* args, int count);

// Enqueues, on `stream`, the weight repack into `packed_weight` (sm90_packed_weight_bytes(args)
// bytes of device memory, 16-byte aligned, free until the launch completes), with split_k > 1
// the zeroing of the tile counters in `workspace` (sm90_workspace_bytes(args, split_k) bytes,
// 16-byte aligned, free until the launch completes; unused for split_k = 1), and one persistent
// launch writing out (same contract as launch_st_conv3d: NTHWC input, (K, kt, kh, kw, C) weight,
// C a multiple of 8, sizes within kMaxIndex). split_k = 1 is one work unit per 128x128 tile;
// split_k > 1 cuts every tile's reduction into split_k slices whose fp32 partial sums the last
// slice to finish adds up, in slice order (the result does not depend on the finishing order),
// before the one fused epilogue. Or returns a status saying why it cannot run here without
// enqueuing anything.
int launch_st_conv3d_sm90(const StConvArgs& args, ConvType type, void* packed_weight,
                          int split_k, void* workspace, cudaStream_t stream);

// One launch computing `count` (1 or 2) problems of identical sizes (the multires fovea and
// context streams), each with its own input, weight, bias and output in args[g], its packed
// weight in packed_weights[g] (sm90_packed_weight_bytes each) and one workspace for all
// (sm90_workspace_bytes(args[0], split_k, count)); the work units of both problems share the
// persistent grid. Same contract otherwise as launch_st_conv3d_sm90 (which is this with 1).
int launch_st_conv3d_sm90_grouped(const StConvArgs* args, int count, ConvType type,
                                  void* const* packed_weights, int split_k, void* workspace,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace vidconv
