// Checks of the preprocessing ops' out= overloads, shared by the CPU and CUDA launchers: the
// out tensors' dtype (checked before the inputs, whose dtype check would otherwise name
// `dtype`, not the tensor), device, shape, layout and overlap with the clips.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <vector>

namespace vidconv {

inline void check_out_dtype(const char* op, const char* name, const at::Tensor& out) {
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
}

// Layout and dtype come from `out`: plain (N, 3, T, S, S) or channels_last_3d.
inline bool out_is_channels_last(const at::Tensor& out) { return !out.is_contiguous(); }

inline void check_out(const char* op, const char* name, const at::Tensor& clips, int64_t size,
                      const at::Tensor& out) {
  TORCH_CHECK(out.device() == clips.device(), op, ": ", name, " must be on clips' device ",
              clips.device(), ", got ", out.device());
  const std::vector<int64_t> expected{clips.size(0), 3, clips.size(1), size, size};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ",
              at::IntArrayRef(expected), ", got ", out.sizes());
  TORCH_CHECK(out.is_contiguous() || out.is_contiguous(at::MemoryFormat::ChannelsLast3d), op,
              ": ", name, " must be contiguous or channels_last_3d, got strides ",
              out.strides());
  at::assert_no_overlap(out, clips);
}

inline void check_out_pair(const at::Tensor& fovea, const at::Tensor& context) {
  TORCH_CHECK(context.scalar_type() == fovea.scalar_type() &&
                  out_is_channels_last(context) == out_is_channels_last(fovea),
              "fovea_context: fovea and context must have the same dtype and layout, got ",
              fovea.scalar_type(), (out_is_channels_last(fovea) ? " channels_last_3d" : ""),
              " and ", context.scalar_type(),
              (out_is_channels_last(context) ? " channels_last_3d" : ""));
  at::assert_no_overlap(fovea, context);
}

}  // namespace vidconv
