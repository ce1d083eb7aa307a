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
from .kernels.geometry import pad4

BN_EPS = 0.001  # torchvision's BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001)


class Layer:
    """Anything that runs kernels. `ops` is the kernel set it calls: the CPU kernels by
    default; `Inception3.to("cuda")` hands every layer the CUDA twins instead."""

    ops = kernels

    def use(self, ops):
        """Run on `ops` from now on, moving this layer's weights there (once)."""
        self.ops = ops


class Taps:
    """Collects named intermediate outputs during one forward pass.

    `wanted` holds dotted layer names (`Mixed_5b.branch_pool`, `Mixed_6e`). Layers call
    `record(name, y)`; only wanted names are copied out (a branch output may be a view
    into its module's concat buffer, which later layers do not overwrite, but a copy
    keeps the caller's arrays independent of pyincept's buffers).
    """

    def __init__(self, wanted=(), to_host=None):
        self.wanted = set(wanted)
        self.outputs = {}
        self.to_host = to_host or kernels.to_host

    def record(self, name, y):
        if name in self.wanted:
            self.outputs[name] = np.array(self.to_host(y), dtype=np.float32, copy=True)
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
    folded_w = np.empty(w.shape, np.float32)                                    # (R, S, C, K)
    np.multiply(w, scale, out=folded_w, casting="unsafe")                      # in float64, rounded once
    folded_b = (beta - mean.astype(np.float64) * scale).astype(np.float32)      # (K,)
    return folded_w, folded_b


class BasicConv2d(Layer):
    """conv (no bias) -> BatchNorm(eps=0.001) -> ReLU, run as one conv with a folded bias."""

    def __init__(self, name, in_channels, out_channels, kernel_size, stride=1, padding=0):
        self.name = name
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
        self.stride = stride
        self.padding = padding
        self.folded = None                # host copy (weight (R, S, C, K), bias (K,)), BN folded in
        self.weight = self.bias = None    # the same, on the device `ops` runs on
        self.algorithm = "im2col"         # or "winograd": used where winograd_applies()
        self.winograd = None              # the weight in the Winograd domain (6, 8, 16 or 36, C, K), when used

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
        self.folded = fold_batchnorm(
            params[f"{p}.conv.weight"], params[f"{p}.bn.weight"], params[f"{p}.bn.bias"],
            params[f"{p}.bn.running_mean"], params[f"{p}.bn.running_var"],
        )
        self.use(self.ops)

    def use(self, ops):
        self.ops = ops
        self.weight, self.bias = (ops.to_device(a) for a in self.folded)
        self.winograd = None
        if self.winograd_applies():                  # a 3x3's tile goes by what measured faster
            tile = ops.winograd_tile(self.in_channels, self.kernel_size)
            self.winograd = ops.winograd_weights(self.folded[0], tile)

    def winograd_applies(self):
        """Winograd serves the stride-1 3x3 convs, the 5x5 ones padded by 2 (Mixed_5b-d),
        and the 1x3 / 3x1 and 1x7 / 7x1 ones (padded only along their own axis, as all of
        v3's are), when asked for and the device has it. AuxLogits' unpadded 5x5 conv makes
        one output pixel from a 5x5 map, where F(2x2, 5x5) would do 1.4x the multiply-adds."""
        top, bottom, left, right = pad4(self.padding)
        shape_ok = (self.kernel_size == (3, 3)
                    or (self.kernel_size == (5, 5) and (top, bottom, left, right) == (2, 2, 2, 2))
                    or (self.kernel_size in ((1, 3), (1, 7)) and not (top or bottom))
                    or (self.kernel_size in ((3, 1), (7, 1)) and not (left or right)))
        return (self.algorithm == "winograd" and shape_ok and self.stride in (1, (1, 1))
                and hasattr(self.ops, "conv2d_winograd"))

    def set_algorithm(self, algorithm):
        self.algorithm = algorithm
        if self.folded is not None:
            self.use(self.ops)

    def __call__(self, x, taps, out=None):
        if self.winograd is not None:
            y = self.ops.conv2d_winograd(x, self.winograd, self.bias, self.padding, relu=True, out=out,
                                         kernel_size=self.kernel_size)
        else:
            y = self.ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, relu=True, out=out)
        return taps.record(self.name, y)


class Linear(Layer):
    """y = x @ w + b, with w stored (in, out)."""

    def __init__(self, name, in_features, out_features):
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.host = None                  # (weight (in, out), bias (out,)) on the host
        self.weight = self.bias = None    # the same, on the device `ops` runs on

    def parameter_shapes(self):
        return {f"{self.name}.weight": (self.in_features, self.out_features), f"{self.name}.bias": (self.out_features,)}

    def load(self, params):
        self.host = tuple(np.ascontiguousarray(params[f"{self.name}.{f}"], np.float32) for f in ("weight", "bias"))
        self.use(self.ops)

    def use(self, ops):
        self.ops = ops
        self.weight, self.bias = (ops.to_device(a) for a in self.host)

    def __call__(self, x, taps):
        return taps.record(self.name, self.ops.linear(x, self.weight, self.bias))


class Block(Layer):
    """A named group of layers (every attribute that is a layer), loaded and listed together."""

    pointwise = None   # a Fused1x1, in blocks whose 1x1 convs share the block's input

    def __init__(self, name):
        self.name = name

    def layers(self):
        return [v for v in vars(self).values() if isinstance(v, (BasicConv2d, Linear))]

    def use(self, ops):
        self.ops = ops
        for layer in self.layers():
            layer.use(ops)
        if self.pointwise is not None:
            self.pointwise.use(ops)

    def parameter_shapes(self):
        shapes = {}
        for layer in self.layers():
            shapes.update(layer.parameter_shapes())
        return shapes

    def load(self, params):
        for layer in self.layers():
            layer.load(params)
        if self.pointwise is not None:
            self.pointwise.load()

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


class Fused1x1(Layer):
    """Every 1x1 conv of a module that reads the module's input, run as ONE matrix product.

    Why it is exact: for pixels as rows, x @ [W1 | W2 | W3] = [x @ W1 | x @ W2 | x @ W3].
    One (N*H*W, C) @ (C, K1+K2+K3) product reads x once and keeps BLAS busier than
    three thin ones; each branch then takes its columns, adds its bias and applies ReLU.

    The pool branch joins too (`pooled`): it is avg_pool 3x3/1 with count_include_pad=True,
    then a 1x1 conv. Both maps are linear and act on different axes (pixels vs channels),
    and the zero padding stays zero under the conv's linear part, so
    W @ avgpool(x) = avgpool(W @ x). Running the conv first pools K = 32..192 channels
    instead of C = 192..2048. The bias must come after the pool: with count_include_pad
    the padding dilutes border means, which would dilute the bias too.

    fused=False runs the members one by one in torchvision's order (pool, then conv): the
    readable path, and the one the tests hold the fused path to.
    """

    def __init__(self, members, pooled=None):
        self.members = list(members) + ([pooled] if pooled is not None else [])
        self.pooled = pooled
        self.fused = True
        self.host_weight = self.weight = None

    def load(self):
        """Concatenate the members' folded (1, 1, C, K_i) weights along K."""
        self.host_weight = np.concatenate([m.folded[0] for m in self.members], axis=3)   # (1, 1, C, sum K)
        self.use(self.ops)

    def use(self, ops):
        self.ops = ops
        if self.host_weight is not None:
            self.weight = ops.to_device(self.host_weight)

    def __call__(self, x, taps, out):
        """Run every member on x. `out` maps some members to the buffer they must fill
        (their slice of the module output); the others' outputs are returned, in order."""
        ops = self.ops
        if not self.fused:
            results = []
            for m in self.members:
                source = ops.avg_pool2d(x, 3, stride=1, padding=1) if m is self.pooled else x
                y = m(source, taps, out=out.get(m))
                if m not in out:
                    results.append(y)
            return results

        N, H, W, _ = x.shape
        outputs = {m: out[m] if m in out else ops.empty((N, H, W, m.out_channels)) for m in self.members}
        # Every member but the pooled one is a head of the GEMM: its columns + its bias, ReLU,
        # into its output, done tile by tile by the GEMM's own threads (kernels' conv2d).
        heads, k0 = [], 0
        for m in self.members:
            if m is self.pooled:
                pooled_k0 = k0
            else:
                heads.append((k0, m.bias, True, outputs[m]))
            k0 += m.out_channels
        raw = ops.conv2d(x, self.weight, heads=heads)                        # (N, H, W, sum K), no bias
        if self.pooled is not None:
            z = raw[..., pooled_k0 : pooled_k0 + self.pooled.out_channels]   # its columns, no bias yet
            z = ops.avg_pool2d(z, 3, stride=1, padding=1)                    # pool after the 1x1 (exact)
            ops.bias_act(z, self.pooled.bias, relu=True, out=outputs[self.pooled])
        for m in self.members:
            taps.record(m.name, outputs[m])
        return [outputs[m] for m in self.members if m not in out]


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
        self.pointwise = Fused1x1([self.branch1x1, self.branch5x5_1, self.branch3x3dbl_1], pooled=self.branch_pool)
        self.widths = [64, 64, 96, pool_features]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 35x35xC
        out = self.ops.empty((N, H, W, sum(self.widths)))                    # 35x35x(224+pool)
        b1x1, b5x5, b3x3dbl, bpool = channel_slices(out, self.widths)
        # branch1x1, branch5x5_1, branch3x3dbl_1 and avgpool->branch_pool: one GEMM;
        # branch1x1 (35x35x64) and branch_pool (35x35xpool) land in their slices of `out`.
        y5, y3 = self.pointwise(x, taps, out={self.branch1x1: b1x1, self.branch_pool: bpool})
        self.branch5x5_2(y5, taps, out=b5x5)                                 # 35x35x48 -> 35x35x64
        y3 = self.branch3x3dbl_2(y3, taps)                                   # 35x35x64 -> 35x35x96
        self.branch3x3dbl_3(y3, taps, out=b3x3dbl)                           # 35x35x96
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
        out = self.ops.empty((N, OH, OW, sum(self.widths)))                  # 17x17x768
        b3x3, b3x3dbl, bpool = channel_slices(out, self.widths)
        self.branch3x3(x, taps, out=b3x3)                                    # 17x17x384
        y = self.branch3x3dbl_1(x, taps)                                     # 35x35x64
        y = self.branch3x3dbl_2(y, taps)                                     # 35x35x96
        self.branch3x3dbl_3(y, taps, out=b3x3dbl)                            # 17x17x96
        self.ops.max_pool2d(x, 3, stride=2, out=bpool)                       # 17x17x288
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
        self.pointwise = Fused1x1([self.branch1x1, self.branch7x7_1, self.branch7x7dbl_1], pooled=self.branch_pool)
        self.widths = [192, 192, 192, 192]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 17x17x768
        out = self.ops.empty((N, H, W, sum(self.widths)))                    # 17x17x768
        b1x1, b7x7, b7x7dbl, bpool = channel_slices(out, self.widths)
        # branch1x1, branch7x7_1, branch7x7dbl_1 and avgpool->branch_pool: one GEMM.
        y7, yd = self.pointwise(x, taps, out={self.branch1x1: b1x1, self.branch_pool: bpool})
        y7 = self.branch7x7_2(y7, taps)                                      # 17x17xc7
        self.branch7x7_3(y7, taps, out=b7x7)                                 # 17x17x192
        yd = self.branch7x7dbl_2(yd, taps)                                   # 17x17xc7
        yd = self.branch7x7dbl_3(yd, taps)
        yd = self.branch7x7dbl_4(yd, taps)                                   # 17x17xc7
        self.branch7x7dbl_5(yd, taps, out=b7x7dbl)                           # 17x17x192
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
        self.pointwise = Fused1x1([self.branch3x3_1, self.branch7x7x3_1])
        self.widths = [320, 192, in_channels]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 17x17x768
        OH, OW = (H - 3) // 2 + 1, (W - 3) // 2 + 1
        out = self.ops.empty((N, OH, OW, sum(self.widths)))                  # 8x8x1280
        b3x3, b7x7x3, bpool = channel_slices(out, self.widths)
        y3, y7 = self.pointwise(x, taps, out={})                             # branch3x3_1, branch7x7x3_1: one GEMM
        self.branch3x3_2(y3, taps, out=b3x3)                                 # 17x17x192 -> 8x8x320
        y7 = self.branch7x7x3_2(y7, taps)
        y7 = self.branch7x7x3_3(y7, taps)                                    # 17x17x192
        self.branch7x7x3_4(y7, taps, out=b7x7x3)                             # 8x8x192
        self.ops.max_pool2d(x, 3, stride=2, out=bpool)                       # 8x8x768
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
        self.pointwise = Fused1x1([self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1], pooled=self.branch_pool)
        self.widths = [320, 384, 384, 384, 384, 192]

    def __call__(self, x, taps):
        N, H, W, _ = x.shape                                                  # 8x8xC
        out = self.ops.empty((N, H, W, sum(self.widths)))                    # 8x8x2048
        b1x1, b3x3a, b3x3b, bdbl_a, bdbl_b, bpool = channel_slices(out, self.widths)
        # branch1x1, branch3x3_1, branch3x3dbl_1 and avgpool->branch_pool: one GEMM.
        y3, yd = self.pointwise(x, taps, out={self.branch1x1: b1x1, self.branch_pool: bpool})
        self.branch3x3_2a(y3, taps, out=b3x3a)                               # 8x8x384 (1x3)
        self.branch3x3_2b(y3, taps, out=b3x3b)                               # 8x8x384 (3x1)
        yd = self.branch3x3dbl_2(yd, taps)                                   # 8x8x448 -> 8x8x384
        self.branch3x3dbl_3a(yd, taps, out=bdbl_a)                           # 8x8x384 (1x3)
        self.branch3x3dbl_3b(yd, taps, out=bdbl_b)                           # 8x8x384 (3x1)
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
        y = self.ops.avg_pool2d(x, 5, stride=3)                              # 5x5x768
        y = self.conv0(y, taps)                                              # 5x5x128
        y = self.conv1(y, taps)                                              # 1x1x768
        y = self.ops.global_avg_pool2d(y)                                    # 1x1x768
        y = self.fc(y.reshape(y.shape[0], -1), taps)                         # 1000
        return taps.record(self.name, y)
