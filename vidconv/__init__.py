"""vidconv: large-scale video classification with temporal-fusion CNNs.

An implementation of Karpathy et al., "Large-scale Video Classification with Convolutional
Neural Networks" (CVPR 2014): fused preprocessing and spatio-temporal convolution kernels
(`vidconv.ops`), drop-in layers (`vidconv.nn`), the paper's single-frame, early, late and slow
fusion networks with their multiresolution variants (`vidconv.models`), and video loaders
(`vidconv.data`).
"""

from vidconv._extension import BuildInfo, build_info
from vidconv import ops  # noqa: I001  (registers fake kernels and autograd with the ops)

__version__ = "0.1.0"

__all__ = ["BuildInfo", "build_info", "ops", "__version__"]
