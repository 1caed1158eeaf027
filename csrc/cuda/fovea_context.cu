// ATen glue of fovea_context and crop_normalize on CUDA: checks, device guard, current stream,
// one launch of the runtime-only kernel in fovea_context_kernel.cu, launch check.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cuda/fovea_context_kernel.h"
#include "preprocess_out.h"

namespace vidconv {
namespace {

// Python validates with full messages (vidconv/ops/preprocess.py); these cheap re-checks keep a
// direct torch.ops call from reaching the kernel with something it cannot read. Offsets are not
// range-checked here (that needs a device sync); the kernel clamps them into the frame.
void check_inputs(const char* op, bool with_context, const at::Tensor& clips, int64_t size,
                  const at::Tensor& offsets, const at::Tensor& flip, at::ArrayRef<double> mean,
                  at::ArrayRef<double> std_, at::ScalarType dtype) {
  TORCH_CHECK(clips.is_cuda(), op, ": clips must be a CUDA tensor");
  TORCH_CHECK(clips.scalar_type() == at::kByte, op, ": clips must be uint8, got ",
              clips.scalar_type());
  TORCH_CHECK(clips.dim() == 5 && clips.size(4) == 3, op,
              ": clips must be (N, T, H, W, 3), got shape ", clips.sizes());
  TORCH_CHECK(clips.is_contiguous(), op, ": clips must be contiguous");
  const int64_t h = clips.size(2), w = clips.size(3);
  TORCH_CHECK(size >= 1 && h >= size && w >= size, op, ": frames must be at least size x size = ",
              size, "x", size, ", got ", h, "x", w);
  TORCH_CHECK(size <= cuda::kMaxSize, op, ": size must be at most ", cuda::kMaxSize,
              " on CUDA, got ", size);
  TORCH_CHECK(h * w * 3 < std::numeric_limits<int32_t>::max(), op,
              ": frames must have fewer than 2^31 bytes, got ", h, "x", w, "x3");
  if (with_context) {
    // A context bin spans at most ceil(H/S) + 1 rows and ceil(W/S) + 1 columns.
    const int64_t bin_area = ((h + size - 1) / size + 1) * ((w + size - 1) / size + 1);
    TORCH_CHECK(255 * bin_area <= cuda::kMaxBinSum, op, ": frames ", h, "x", w,
                " are too large for output size ", size, " (area bins overflow 32-bit sums)");
  }
  const int64_t n = clips.size(0);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 2 && offsets.size(0) == n &&
                  offsets.size(1) == 2 && offsets.is_contiguous(),
              op, ": offsets must be contiguous int64 (", n, ", 2), got ", offsets.scalar_type(),
              " ", offsets.sizes());
  TORCH_CHECK(flip.scalar_type() == at::kBool && flip.dim() == 1 && flip.size(0) == n &&
                  flip.is_contiguous(),
              op, ": flip must be contiguous bool (", n, ",), got ", flip.scalar_type(), " ",
              flip.sizes());
  TORCH_CHECK(offsets.device() == clips.device() && flip.device() == clips.device(), op,
              ": offsets and flip must be on clips' device ", clips.device(), ", got ",
              offsets.device(), " and ", flip.device());
  TORCH_CHECK(mean.size() == 3 && std_.size() == 3, op, ": mean and std must have 3 entries");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
}

at::Tensor new_output(const at::Tensor& clips, int64_t size, at::ScalarType dtype,
                      bool channels_last) {
  return at::empty({clips.size(0), 3, clips.size(1), size, size}, clips.options().dtype(dtype),
                   channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous);
}

void run(const at::Tensor& clips, int64_t size, const at::Tensor& offsets, const at::Tensor& flip,
         at::ArrayRef<double> mean, at::ArrayRef<double> std_, bool channels_last,
         at::Tensor& fovea, at::Tensor* context) {
  if (clips.size(0) == 0 || clips.size(1) == 0) {
    return;
  }
  cuda::PreprocessArgs args{};
  args.clips = clips.data_ptr<uint8_t>();
  args.n = clips.size(0);
  args.t = clips.size(1);
  args.h = static_cast<int>(clips.size(2));
  args.w = static_cast<int>(clips.size(3));
  args.size = static_cast<int>(size);
  args.offsets = offsets.data_ptr<int64_t>();
  args.flip = flip.data_ptr<bool>();
  for (int c = 0; c < 3; ++c) {
    // Same float constants as the CPU kernel, so both give the same bits.
    args.mean[c] = static_cast<float>(mean[c]);
    args.inv_std[c] = 1.0f / static_cast<float>(std_[c]);
  }
  args.fovea = fovea.data_ptr();
  args.context = context ? context->data_ptr() : nullptr;
  switch (fovea.scalar_type()) {
    case at::kFloat:
      args.out_type = cuda::OutType::kFloat32;
      break;
    case at::kHalf:
      args.out_type = cuda::OutType::kFloat16;
      break;
    default:
      args.out_type = cuda::OutType::kBFloat16;
      break;
  }
  args.channels_last = channels_last;
  TORCH_CHECK(args.n * args.t * size < std::numeric_limits<int32_t>::max(),
              "fovea_context: too many frames for one launch (N * T * size must be < 2^31)");
  cuda::launch_fovea_context(args, at::cuda::getCurrentCUDAStream(clips.get_device()).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> fovea_context_cuda(const at::Tensor& clips, int64_t size,
                                                       const at::Tensor& offsets,
                                                       const at::Tensor& flip,
                                                       at::ArrayRef<double> mean,
                                                       at::ArrayRef<double> std_,
                                                       at::ScalarType dtype, bool channels_last) {
  check_inputs("fovea_context", true, clips, size, offsets, flip, mean, std_, dtype);
  const c10::cuda::CUDAGuard guard(clips.device());
  at::Tensor fovea = new_output(clips, size, dtype, channels_last);
  at::Tensor context = new_output(clips, size, dtype, channels_last);
  run(clips, size, offsets, flip, mean, std_, channels_last, fovea, &context);
  return {fovea, context};
}

at::Tensor crop_normalize_cuda(const at::Tensor& clips, int64_t size, const at::Tensor& offsets,
                               const at::Tensor& flip, at::ArrayRef<double> mean,
                               at::ArrayRef<double> std_, at::ScalarType dtype,
                               bool channels_last) {
  check_inputs("crop_normalize", false, clips, size, offsets, flip, mean, std_, dtype);
  const c10::cuda::CUDAGuard guard(clips.device());
  at::Tensor out = new_output(clips, size, dtype, channels_last);
  run(clips, size, offsets, flip, mean, std_, channels_last, out, nullptr);
  return out;
}

// The out= overloads write the caller's tensors; layout and dtype come from `out`.
void fovea_context_out_cuda(
    const at::Tensor& clips, int64_t size, const at::Tensor& offsets, const at::Tensor& flip,
    at::ArrayRef<double> mean, at::ArrayRef<double> std_, at::Tensor& fovea,
    at::Tensor& context) {
  check_out_dtype("fovea_context", "fovea", fovea);
  check_inputs("fovea_context", true, clips, size, offsets, flip, mean, std_,
               fovea.scalar_type());
  check_out("fovea_context", "fovea", clips, size, fovea);
  check_out("fovea_context", "context", clips, size, context);
  check_out_pair(fovea, context);
  const c10::cuda::CUDAGuard guard(clips.device());
  run(clips, size, offsets, flip, mean, std_, out_is_channels_last(fovea), fovea, &context);
}

void crop_normalize_out_cuda(const at::Tensor& clips, int64_t size,
                             const at::Tensor& offsets, const at::Tensor& flip,
                             at::ArrayRef<double> mean, at::ArrayRef<double> std_,
                             at::Tensor& out) {
  check_out_dtype("crop_normalize", "out", out);
  check_inputs("crop_normalize", false, clips, size, offsets, flip, mean, std_,
               out.scalar_type());
  check_out("crop_normalize", "out", clips, size, out);
  const c10::cuda::CUDAGuard guard(clips.device());
  run(clips, size, offsets, flip, mean, std_, out_is_channels_last(out), out, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(vidconv, CUDA, m) {
  m.impl("fovea_context", &fovea_context_cuda);
  m.impl("crop_normalize", &crop_normalize_cuda);
  m.impl("fovea_context.out", &fovea_context_out_cuda);
  m.impl("crop_normalize.out", &crop_normalize_out_cuda);
}

}  // namespace vidconv
