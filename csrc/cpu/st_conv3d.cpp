// CPU path of st_conv3d: ATen's conv3d with the bias add and ReLU applied in place on its
// output (correct, not hand-tuned), and the matching backward through convolution_backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

namespace vidconv {
namespace {

at::Tensor st_conv3d_cpu(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, bool relu) {
  TORCH_CHECK(x.dim() == 5 && weight.dim() == 5, "st_conv3d: x and weight must be 5-D");
  TORCH_CHECK(stride.size() == 3 && padding.size() == 3,
              "st_conv3d: stride and padding must have 3 entries");
  // ATen follows a channels_last_3d input with a channels_last_3d output; the op promises
  // contiguous on the CPU (what the fake kernel reports, so torch.compile sees true strides).
  at::Tensor out = at::conv3d(x, weight, bias, stride, padding).contiguous();
  if (relu) {
    out.relu_();
  }
  return out;
}

// `grad` laid out like `like` (what empty_like(like), the fake kernel's choice, gives).
at::Tensor strided_like(const at::Tensor& grad, const at::Tensor& like) {
  if (grad.strides() == like.strides()) {
    return grad;
  }
  at::Tensor out = at::empty_like(like);
  out.copy_(grad);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> st_conv3d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding, bool relu,
    std::array<bool, 3> output_mask) {
  // d relu(y)/dy is 1 where the output is positive: the saved output carries the mask.
  at::Tensor grad = relu ? grad_out * out.gt(0).to(grad_out.scalar_type()) : grad_out;
  const std::vector<int64_t> bias_sizes{weight.size(0)};
  auto [gx, gw, gb] = at::convolution_backward(
      grad, x, weight, bias_sizes, stride, padding, /*dilation=*/{1, 1, 1},
      /*transposed=*/false, /*output_padding=*/{0, 0, 0}, /*groups=*/1,
      output_mask);
  auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {output_mask[0] ? strided_like(gx, x) : empty(x),
          output_mask[1] ? strided_like(gw, weight) : empty(weight),
          output_mask[2] ? gb : empty(weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vidconv, CPU, m) {
  m.impl("st_conv3d", &st_conv3d_cpu);
  m.impl("st_conv3d_backward", &st_conv3d_backward_cpu);
}

}  // namespace vidconv
