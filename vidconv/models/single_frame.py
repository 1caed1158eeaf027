"""Single-frame network: the tower every fusion model of the paper is built from.

Karpathy et al. 2014, Sec. 3.1 ("Time Information Fusion in CNNs", single-frame baseline),
numbers as collected in shared/paper.md::

    layer   filters  kernel (t,h,w)  stride  padding  then      output (C x T x H x W)
    input                                                        3 x 1 x 170 x 170
    conv1   96       1 x 11 x 11     1,3,3   0        ReLU N P   96 x 1 x 54 x 54 -> 27 x 27
    conv2   256      1 x 5 x 5       1       0,2,2    ReLU N P   256 x 1 x 27 x 27 -> 14 x 14
    conv3   384      1 x 3 x 3       1       0,1,1    ReLU       384 x 1 x 14 x 14
    conv4   384      1 x 3 x 3       1       0,1,1    ReLU       384 x 1 x 14 x 14
    conv5   256      1 x 3 x 3       1       0,1,1    ReLU P     256 x 1 x 14 x 14 -> 7 x 7
    fc1     4096                                      ReLU       (12544 inputs = 256*7*7)
    fc2     4096                                      ReLU
    classifier  num_classes (487 for Sports-1M), softmax in the loss

From the paper: the layer list C(96,11,3)-N-P-C(256,5,1)-N-P-C(384,3,1)-C(384,3,1)-C(256,3,1)-
P-FC(4096)-FC(4096), ReLU after every conv and FC layer, input 170x170x3, P = max pooling over
non-overlapping 2x2 regions, N = LRN with n=5, alpha=1e-4, beta=0.5, k=2, and the sizes the
tower must produce: 170 -> 54 -> 27 -> 27 -> 14 -> 14 -> 7 (ending at 7x7x256).

Our choices where the paper is silent, made so those sizes come out:

- conv1 is unpadded ((170 - 11) / 3 + 1 = 54); conv2..conv5 are zero-padded to keep their
  size (padding 2 for 5x5, 1 for 3x3).
- Pooling uses ceil mode, so the odd 27 pools to 14 (the last window covers the border row).
- LRN divides alpha by n, the torch/Caffe/cuda-convnet convention (see vidconv.models.tower).
- Dropout (default p=0.5) before fc1, fc2 and the classifier; the paper mentions dropout only for
  transfer learning (keeping as few as 10% of units: ``set_dropout(0.9)``).
- He (Kaiming) normal initialisation for conv and hidden FC layers, N(0, 0.01) for the
  classifier, zero biases; the paper does not give its initialisation.

Parameters with 487 classes: conv 3,747,200 + fc1 51,384,320 + fc2 16,781,312 + classifier
1,995,239 = 73,908,071.
"""

from __future__ import annotations

from vidconv.models.registry import Architecture, register
from vidconv.models.tower import ConvLayer

SINGLE_FRAME_LAYERS: tuple[ConvLayer, ...] = (
    ConvLayer("conv1", 96, (1, 11, 11), stride=(1, 3, 3), norm=True, pool=True),
    ConvLayer("conv2", 256, (1, 5, 5), padding=(0, 2, 2), norm=True, pool=True),
    ConvLayer("conv3", 384, (1, 3, 3), padding=(0, 1, 1)),
    ConvLayer("conv4", 384, (1, 3, 3), padding=(0, 1, 1)),
    ConvLayer("conv5", 256, (1, 3, 3), padding=(0, 1, 1), pool=True),
)

SINGLE_FRAME = register(Architecture(
    name="single_frame",
    frame_offsets=(0,),
    layers=SINGLE_FRAME_LAYERS,
    summary="one frame per clip; appearance only",
))
