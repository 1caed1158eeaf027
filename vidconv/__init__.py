"""vidconv: large-scale video classification with temporal-fusion CNNs.

An implementation of Karpathy et al., "Large-scale Video Classification with Convolutional
Neural Networks" (CVPR 2014): fused preprocessing and spatio-temporal convolution kernels
(`vidconv.ops`), drop-in layers (`vidconv.nn`), the paper's single-frame, early, late and slow
fusion networks with their multiresolution variants (`vidconv.models`), and video loaders
(`vidconv.data`).
"""

# _C first: it defines the ops that vidconv.ops registers fake kernels and autograd for.
from vidconv._extension import BuildInfo, build_info  # noqa: I001
from vidconv import ops

__version__ = "0.1.0"

__all__ = ["BuildInfo", "build_info", "ops", "__version__"]
