"""vidconv's ops: the functions users call, over the kernels registered as torch.ops.vidconv.

Each op has a CPU kernel, a CUDA kernel (when built with CUDA), a fake kernel for
torch.compile, and a plain-PyTorch version in `vidconv.reference` that the tests compare against.
"""

from vidconv.ops.conv_planner import clear_conv_plan, conv_plan, use_conv_algo
from vidconv.ops.fully_connected import clear_linear_plan, linear, linear_plan
from vidconv.ops.lrn_pool import clear_lrn_pool_plan, lrn_max_pool, lrn_pool_plan
from vidconv.ops.preprocess import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    clear_preprocess_plan,
    crop_normalize,
    fovea_context,
    preprocess_plan,
)
from vidconv.ops.st_conv import st_conv3d
from vidconv.ops.st_conv_pair import clear_pair_plan, pair_plan, st_conv3d_pair

__all__ = ["DEFAULT_MEAN", "DEFAULT_STD", "clear_conv_plan", "clear_linear_plan",
           "clear_lrn_pool_plan", "clear_pair_plan", "clear_preprocess_plan", "conv_plan",
           "crop_normalize", "fovea_context", "linear", "linear_plan", "lrn_max_pool",
           "lrn_pool_plan", "pair_plan", "preprocess_plan", "st_conv3d", "st_conv3d_pair",
           "use_conv_algo"]
