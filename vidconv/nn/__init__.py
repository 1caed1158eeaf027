"""Drop-in layers for people who use vidconv inside their own models.

- :class:`SpatioTemporalConv`: ``nn.Conv3d`` with the fused conv3d + bias + ReLU forward.
- :class:`Linear`: ``nn.Linear`` with a measured choice of GEMM orientation.
- :func:`convert`: swap the ``nn.Conv3d`` (and following ``nn.ReLU``) layers of any model for it.
- :class:`FoveaContext`, :class:`CropNormalize`: the fused preprocessing ops as modules.
"""

from vidconv.nn.conv import SpatioTemporalConv
from vidconv.nn.convert import convert
from vidconv.nn.linear import Linear
from vidconv.nn.preprocess import CropNormalize, FoveaContext

__all__ = ["CropNormalize", "FoveaContext", "Linear", "SpatioTemporalConv", "convert"]
