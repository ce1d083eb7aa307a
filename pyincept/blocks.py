"""The building blocks of Inception v3: BasicConv2d, InceptionA-E and InceptionAux.

An Inception module runs several branches on the same input (1x1, factorised 3x3 /
5x5 / 7x7 convolutions, and a pooling branch) and concatenates their outputs along
channels (Szegedy et al. 2015, "Rethinking the Inception Architecture", sections
2-6; the blog post in shared/seed counts eleven of them in v3). Here every branch
writes straight into its slice of one preallocated output, so the concatenation
costs nothing.

Names, channel counts, kernel sizes and paddings are torchvision's
(`torchvision/models/inception.py`), so `Mixed_5b.branch3x3dbl_2.conv.weight` in a
checkpoint maps to exactly one array here. What this is not: a trainable module
system. Blocks hold inference weights and call kernels; that is all.

Shapes are NHWC throughout; the comments give them for a 299x299 input.
"""

import numpy as np

from . import kernels

BN_EPS = 0.001  # torchvision's BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001)


class Taps:
    """Collects named intermediate outputs during one forward pass.

    `wanted` holds dotted layer names (`Mixed_5b.branch_pool`, `Mixed_6e`). Layers call
    `record(name, y)`; only wanted names are copied out (a branch output may be a view
    into its module's concat buffer, which later layers do not overwrite, but a copy
    keeps the caller's arrays independent of pyincept's buffers).
    """

    def __init__(self, wanted=()):
        self.wanted = set(wanted)
        self.outputs = {}

    def record(self, name, y):
        if name in self.wanted:
            self.outputs[name] = np.array(y, dtype=np.float32, copy=True)
        return y


def fold_batchnorm(w, gamma, beta, mean, var, eps=BN_EPS):
    """Fold inference batch norm into the convolution before it.

    BN(conv(x)) = gamma * (w*x - mean) / sqrt(var + eps) + beta, and that is a convolution
    with the same kernel shape: each output channel k's filter is scaled by
    gamma[k] / sqrt(var[k] + eps), and the bias is beta[k] - mean[k] * that scale. One conv
    with a bias replaces conv + four per-channel vector ops, for free at load time.
    w is HWIO (R, S, C, K); the vectors are (K,). Computed in float64, stored float32.
    """
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)   # (K,)
    folded_w = (w.astype(np.float64) * scale).astype(np.float32)                # (R, S, C, K)
    folded_b = (beta - mean.astype(np.float64) * scale).astype(np.float32)      # (K,)
    return folded_w, folded_b


class BasicConv2d:
    """conv (no bias) -> BatchNorm(eps=0.001) -> ReLU, run as one conv with a folded bias."""

    def __init__(self, name, in_channels, out_channels, kernel_size, stride=1, padding=0):
        self.name = name
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
        self.stride = stride
        self.padding = padding
        self.weight = None  # folded (R, S, C, K)
        self.bias = None    # folded (K,)

    def parameter_shapes(self):
        """{checkpoint key: shape in pyincept layout} for this layer."""
        R, S = self.kernel_size
        K = self.out_channels
        shapes = {f"{self.name}.conv.weight": (R, S, self.in_channels, K)}
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{self.name}.bn.{field}"] = (K,)
        return shapes

    def load(self, params):
        p = self.name
        self.weight, self.bias = fold_batchnorm(
            params[f"{p}.conv.weight"], params[f"{p}.bn.weight"], params[f"{p}.bn.bias"],
            params[f"{p}.bn.running_mean"], params[f"{p}.bn.running_var"],
        )

    def __call__(self, x, taps, out=None):
        y = kernels.conv2d(x, self.weight, self.bias, self.stride, self.padding, relu=True, out=out)
        return taps.record(self.name, y)


class Linear:
    """y = x @ w + b, with w stored (in, out)."""

    def __init__(self, name, in_features, out_features):
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.bias = None

    def parameter_shapes(self):
        return {f"{self.name}.weight": (self.in_features, self.out_features), f"{self.name}.bias": (self.out_features,)}

    def load(self, params):
        self.weight = np.ascontiguousarray(params[f"{self.name}.weight"], np.float32)
        self.bias = np.ascontiguousarray(params[f"{self.name}.bias"], np.float32)

    def __call__(self, x, taps):
        return taps.record(self.name, kernels.linear(x, self.weight, self.bias))


class Block:
    """A named group of layers (every attribute that is a layer), loaded and listed together."""

    def __init__(self, name):
        self.name = name

    def layers(self):
        return [v for v in vars(self).values() if isinstance(v, (BasicConv2d, Linear))]

    def parameter_shapes(self):
        shapes = {}
        for layer in self.layers():
            shapes.update(layer.parameter_shapes())
        return shapes

    def load(self, params):
        for layer in self.layers():
            layer.load(params)

    def layer_names(self):
        return [layer.name for layer in self.layers()]

    def _conv(self, branch, *args, **kwargs):
        return BasicConv2d(f"{self.name}.{branch}", *args, **kwargs)


def channel_slices(out, widths):
    """Split a (N, H, W, sum(widths)) buffer into consecutive channel views, one per branch."""
    views, k0 = [], 0
    for width in widths:
        views.append(out[..., k0 : k0 + width])
        k0 += width
    assert k0 == out.shape[3]
    return views


class InceptionA(Block):
    """35x35 module (Mixed_5b-d): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    def __init__(self, name, in_channels, pool_features):
        super().__init__(name)
        self.branch1x1 = self._conv("branch1x1", in_channels, 64, 1)
        self.branch5x5_1 = self._conv("branch5x5_1", in_channels, 48, 1)
        self.branch5x5_2 = self._conv("branch5x5_2", 48, 64, 5, padding=2)
        self.branch3x3dbl_1 = self._conv("branch3x3dbl_1", in_channels, 64, 1)
        self.branch3x3dbl_2 = self._conv("branch3x3dbl_2", 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = self._conv("branch3x3dbl_3", 96, 96, 3, padding=1)
        self.branch_pool = self._conv("branch_pool", in_channels, pool_features, 1)
        self.widths = [64, 64, 96, pool_features]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 35x35xC
        out = np.empty((N, H, W, sum(self.widths)), np.float32)              # 35x35x(224+pool)
        b1x1, b5x5, b3x3dbl, bpool = channel_slices(out, self.widths)
        self.branch1x1(x, taps, out=b1x1)                                    # 35x35x64
        y = self.branch5x5_1(x, taps)                                        # 35x35x48
        self.branch5x5_2(y, taps, out=b5x5)                                  # 35x35x64
        y = self.branch3x3dbl_1(x, taps)                                     # 35x35x64
        y = self.branch3x3dbl_2(y, taps)                                     # 35x35x96
        self.branch3x3dbl_3(y, taps, out=b3x3dbl)                            # 35x35x96
        y = kernels.avg_pool2d(x, 3, stride=1, padding=1)                    # 35x35xC
        self.branch_pool(y, taps, out=bpool)                                 # 35x35xpool
        return taps.record(self.name, out)


class InceptionB(Block):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    def __init__(self, name, in_channels):
        super().__init__(name)
        self.branch3x3 = self._conv("branch3x3", in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = self._conv("branch3x3dbl_1", in_channels, 64, 1)
        self.branch3x3dbl_2 = self._conv("branch3x3dbl_2", 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = self._conv("branch3x3dbl_3", 96, 96, 3, stride=2)
        self.widths = [384, 96, in_channels]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 35x35x288
        OH, OW = (H - 3) // 2 + 1, (W - 3) // 2 + 1
        out = np.empty((N, OH, OW, sum(self.widths)), np.float32)            # 17x17x768
        b3x3, b3x3dbl, bpool = channel_slices(out, self.widths)
        self.branch3x3(x, taps, out=b3x3)                                    # 17x17x384
        y = self.branch3x3dbl_1(x, taps)                                     # 35x35x64
        y = self.branch3x3dbl_2(y, taps)                                     # 35x35x96
        self.branch3x3dbl_3(y, taps, out=b3x3dbl)                            # 17x17x96
        kernels.max_pool2d(x, 3, stride=2, out=bpool)                        # 17x17x288
        return taps.record(self.name, out)


class InceptionC(Block):
    """17x17 module (Mixed_6b-e), 7x7 factorised into 1x7 and 7x1:
    1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avgpool->1x1."""

    def __init__(self, name, in_channels, channels_7x7):
        super().__init__(name)
        c7 = channels_7x7
        self.branch1x1 = self._conv("branch1x1", in_channels, 192, 1)
        self.branch7x7_1 = self._conv("branch7x7_1", in_channels, c7, 1)
        self.branch7x7_2 = self._conv("branch7x7_2", c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = self._conv("branch7x7_3", c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = self._conv("branch7x7dbl_1", in_channels, c7, 1)
        self.branch7x7dbl_2 = self._conv("branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = self._conv("branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = self._conv("branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = self._conv("branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = self._conv("branch_pool", in_channels, 192, 1)
        self.widths = [192, 192, 192, 192]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 17x17x768
        out = np.empty((N, H, W, sum(self.widths)), np.float32)              # 17x17x768
        b1x1, b7x7, b7x7dbl, bpool = channel_slices(out, self.widths)
        self.branch1x1(x, taps, out=b1x1)                                    # 17x17x192
        y = self.branch7x7_1(x, taps)                                        # 17x17xc7
        y = self.branch7x7_2(y, taps)                                        # 17x17xc7
        self.branch7x7_3(y, taps, out=b7x7)                                  # 17x17x192
        y = self.branch7x7dbl_1(x, taps)                                     # 17x17xc7
        y = self.branch7x7dbl_2(y, taps)
        y = self.branch7x7dbl_3(y, taps)
        y = self.branch7x7dbl_4(y, taps)                                     # 17x17xc7
        self.branch7x7dbl_5(y, taps, out=b7x7dbl)                            # 17x17x192
        y = kernels.avg_pool2d(x, 3, stride=1, padding=1)                    # 17x17x768
        self.branch_pool(y, taps, out=bpool)                                 # 17x17x192
        return taps.record(self.name, out)


class InceptionD(Block):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

    def __init__(self, name, in_channels):
        super().__init__(name)
        self.branch3x3_1 = self._conv("branch3x3_1", in_channels, 192, 1)
        self.branch3x3_2 = self._conv("branch3x3_2", 192, 320, 3, stride=2)
        self.branch7x7x3_1 = self._conv("branch7x7x3_1", in_channels, 192, 1)
        self.branch7x7x3_2 = self._conv("branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = self._conv("branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = self._conv("branch7x7x3_4", 192, 192, 3, stride=2)
        self.widths = [320, 192, in_channels]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 17x17x768
        OH, OW = (H - 3) // 2 + 1, (W - 3) // 2 + 1
        out = np.empty((N, OH, OW, sum(self.widths)), np.float32)            # 8x8x1280
        b3x3, b7x7x3, bpool = channel_slices(out, self.widths)
        y = self.branch3x3_1(x, taps)                                        # 17x17x192
        self.branch3x3_2(y, taps, out=b3x3)                                  # 8x8x320
        y = self.branch7x7x3_1(x, taps)                                      # 17x17x192
        y = self.branch7x7x3_2(y, taps)
        y = self.branch7x7x3_3(y, taps)                                      # 17x17x192
        self.branch7x7x3_4(y, taps, out=b7x7x3)                              # 8x8x192
        kernels.max_pool2d(x, 3, stride=2, out=bpool)                        # 8x8x768
        return taps.record(self.name, out)


class InceptionE(Block):
    """8x8 module (Mixed_7b-c), expanded filter banks: 1x1 | 1x1->(1x3 and 3x1) |
    1x1->3x3->(1x3 and 3x1) | avgpool->1x1. Each split branch writes two slices."""

    def __init__(self, name, in_channels):
        super().__init__(name)
        self.branch1x1 = self._conv("branch1x1", in_channels, 320, 1)
        self.branch3x3_1 = self._conv("branch3x3_1", in_channels, 384, 1)
        self.branch3x3_2a = self._conv("branch3x3_2a", 384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = self._conv("branch3x3_2b", 384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = self._conv("branch3x3dbl_1", in_channels, 448, 1)
        self.branch3x3dbl_2 = self._conv("branch3x3dbl_2", 448, 384, 3, padding=1)
        self.branch3x3dbl_3a = self._conv("branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = self._conv("branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = self._conv("branch_pool", in_channels, 192, 1)
        self.widths = [320, 384, 384, 384, 384, 192]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 8x8xC
        out = np.empty((N, H, W, sum(self.widths)), np.float32)              # 8x8x2048
        b1x1, b3x3a, b3x3b, bdbl_a, bdbl_b, bpool = channel_slices(out, self.widths)
        self.branch1x1(x, taps, out=b1x1)                                    # 8x8x320
        y = self.branch3x3_1(x, taps)                                        # 8x8x384
        self.branch3x3_2a(y, taps, out=b3x3a)                                # 8x8x384
        self.branch3x3_2b(y, taps, out=b3x3b)                                # 8x8x384
        y = self.branch3x3dbl_1(x, taps)                                     # 8x8x448
        y = self.branch3x3dbl_2(y, taps)                                     # 8x8x384
        self.branch3x3dbl_3a(y, taps, out=bdbl_a)                            # 8x8x384
        self.branch3x3dbl_3b(y, taps, out=bdbl_b)                            # 8x8x384
        y = kernels.avg_pool2d(x, 3, stride=1, padding=1)                    # 8x8xC
        self.branch_pool(y, taps, out=bpool)                                 # 8x8x192
        return taps.record(self.name, out)


class InceptionAux(Block):
    """The auxiliary classifier on Mixed_6e (a training-time regulariser in the paper):
    avgpool 5/3 -> 1x1 conv -> 5x5 conv -> global avgpool -> fc."""

    def __init__(self, name, in_channels, num_classes):
        super().__init__(name)
        self.conv0 = self._conv("conv0", in_channels, 128, 1)
        self.conv1 = self._conv("conv1", 128, 768, 5)
        self.fc = Linear(f"{name}.fc", 768, num_classes)

    def __call__(self, x, taps):
        y = kernels.avg_pool2d(x, 5, stride=3)                               # 5x5x768
        y = self.conv0(y, taps)                                              # 5x5x128
        y = self.conv1(y, taps)                                              # 1x1x768
        y = kernels.global_avg_pool2d(y)                                     # 1x1x768
        y = self.fc(y.reshape(y.shape[0], -1), taps)                         # 1000
        return taps.record(self.name, y)
