"""What every network in the family is made of: BasicConv2d, Linear, Pool, the Inception
module as a table of branches (Block), and Taps, which catches named outputs on the way.

An Inception module runs several branches on the same input (1x1, factorised 3x3 / 5x5 /
7x7 convolutions, and a pooling branch) and concatenates their outputs along channels
(Szegedy et al. 2014, "Going deeper with convolutions", section 4; 2015, "Rethinking the
Inception Architecture", sections 2-6). A Block says exactly that: `self.branches` lists
each branch's steps in torchvision's `forward` order, and running the block runs each
branch, its last step writing straight into its slice of one preallocated output, so the
concatenation costs nothing. An optimisation (fusion.py) may be laid over that table;
the table itself stays the readable definition.

Names, channel counts, kernel sizes and paddings are torchvision's, so a checkpoint key
such as `Mixed_5b.branch3x3dbl_2.conv.weight` maps to exactly one array here. What this
is not: a trainable module system. Layers hold inference weights and call kernels.

Shapes are NHWC throughout: (N, H, W, C).
"""

import numpy as np

from . import kernels
from .errors import PyinceptError
from .kernels.geometry import conv_output_hw, pad4, pair, pool_output_size

BN_EPS = 0.001  # torchvision's BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001)


class Layer:
    """Anything that runs kernels. `ops` is the kernel set it calls: the CPU kernels by
    default; `Network.to(device)` hands every layer another backend's twins instead."""

    ops = kernels
    name = None

    def use(self, ops):
        """Run on `ops` from now on, moving this layer's weights there (once)."""
        self.ops = ops

    def parameter_shapes(self):
        return {}

    def load(self, params, lean=False):
        """Take this layer's weights from `params`. lean: its network can read them again
        (`Network.reload`), so keep only the form its kernel reads."""

    def layer_names(self):
        """The names `run` can tap in this layer: its own, when it has one."""
        return [self.name] if self.name else []

    # The backward pass. Every layer that runs forward as y = layer(x, taps) has
    #     y = layer.direct(x, taps[, out])   the forward the backward differentiates
    #     dx = layer.vjp(x, y, dy, grads)    the gradient at its input, from dy = dL/dy
    # grads: None, or a dict that collects dL/dparameter by checkpoint key (pyincept layout).

    def direct(self, x, taps, out=None):
        """The forward the backward differentiates: this layer's own, where it has no
        Winograd convolution inside (BasicConv2d, Split and Block say otherwise)."""
        return self(x, taps) if out is None else self(x, taps, out=out)


class Taps:
    """Collects named intermediate outputs during one forward pass.

    `wanted` holds dotted layer names (`Mixed_5b.branch_pool`, `inception4a`). Layers call
    `record(name, y)`; only wanted names are copied out (an output may be a view into its
    module's concat buffer; a copy keeps the caller's arrays independent of pyincept's).
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


def fold_batchnorm_vjp(dw_folded, db_folded, w, gamma, mean, var, eps=BN_EPS):
    """fold_batchnorm backwards: the gradients of the checkpoint's own parameters from those
    of the folded conv (W' = W * s, b' = beta - mean * s, s = gamma / sqrt(var + eps)),
    the running statistics frozen (eval-mode batch norm, as fine-tuning with frozen
    statistics has it):

        dW     = dW' * s                                        (per output channel k)
        dgamma = (sum over R, S, C of dW' * W  -  db' * mean) / sqrt(var + eps)
        dbeta  = db'
    -> (dW (R, S, C, K), dgamma (K,), dbeta (K,)), in float64 where any input is, else float32."""
    dtype = np.result_type(dw_folded, w, np.float32)
    root = np.sqrt(np.asarray(var, np.float64) + eps)
    scale = gamma / root
    dw = dw_folded * scale
    dgamma = ((dw_folded * w).reshape(-1, w.shape[-1]).sum(axis=0) - db_folded * mean) / root
    return dw.astype(dtype), dgamma.astype(dtype), np.asarray(db_folded, dtype)


class BasicConv2d(Layer):
    """conv (no bias) -> BatchNorm(eps) -> ReLU, run as one conv with a folded bias."""

    def __init__(self, name, in_channels, out_channels, kernel_size, stride=1, padding=0, eps=BN_EPS):
        self.name = name
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size)
        self.stride = stride
        self.padding = padding
        self.eps = eps
        self.folded = None                # host copy (weight (R, S, C, K), bias (K,)), BN folded in
        self.weight = self.bias = None    # the same, on the device `ops` runs on, as far as it runs them
        self.algorithm = "im2col"         # or "winograd": used where winograd_applies()
        self.winograd = None              # the weight in the Winograd domain, when used
        self.fused = False                # run inside its module's one 1x1 GEMM (fusion.py)
        self.bn = None                    # (gamma, mean, var): what the backward maps gradients through

    def parameter_shapes(self):
        """{checkpoint key: shape in pyincept layout} for this layer."""
        R, S = self.kernel_size
        K = self.out_channels
        shapes = {f"{self.name}.conv.weight": (R, S, self.in_channels, K)}
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{self.name}.bn.{field}"] = (K,)
        return shapes

    def load(self, params, lean=False):
        p = self.name
        gamma, beta, mean, var = (params[f"{p}.bn.{f}"] for f in ("weight", "bias", "running_mean", "running_var"))
        self.folded = fold_batchnorm(params[f"{p}.conv.weight"], gamma, beta, mean, var, eps=self.eps)
        self.bn = tuple(np.array(v, np.float32) for v in (gamma, mean, var))
        self.use(self.ops)
        if lean:                 # at once, not after its module: the loading peak is Mixed_7c's
            self.keep_kernel_form_only()

    def use(self, ops):
        """Build on `ops` only the weight form its kernel reads: the Winograd filters where
        Winograd runs, none for a fused 1x1 (its module's GEMM holds its columns), else the
        folded filters. Each weight is held once (`keep_kernel_form_only`)."""
        self.ops = ops
        if self.folded is None:
            return
        weight, bias = self.folded
        self.bias = ops.to_device(bias)
        self.weight = self.winograd = None
        if self.fused:                               # its module's GEMM holds its columns
            return
        if weight is None:
            raise PyinceptError(f"{self.name} holds its weights in its kernel's form only: "
                                "switch the algorithm, fusion or device through the network, which reloads them")
        if self.winograd_applies():                  # a 3x3's tile goes by what measured faster
            tile = ops.winograd_tile(self.in_channels, self.kernel_size)
            self.winograd = ops.winograd_weights(weight, tile)
        else:
            self.weight = ops.pack_weights(weight)              # the CPU's panels, made once

    def keep_kernel_form_only(self):
        """Let go of the host filters where the kernel runs from a form of its own: Winograd
        filters, the CPU's weight panels, a GPU copy (a fused member's go with its plan's,
        `Pointwise1x1.keep_kernel_form_only`). `Network.reload` brings them back when another
        algorithm, fusion or device needs them."""
        if self.folded is None or self.folded[0] is None:
            return
        if self.winograd is not None or (self.weight is not None and self.weight is not self.folded[0]):
            self.folded = (None, self.folded[1])

    def holds_host_weight(self):
        return self.folded is None or self.folded[0] is not None

    def winograd_applies(self):
        """Winograd serves the stride-1 3x3 convs, the 5x5 ones padded by 2, and the 1x3 / 3x1
        and 1x7 / 7x1 ones padded only along their own axis, when asked for and the backend
        has it. An unpadded 5x5 on a 5x5 map (v3's aux head) makes one output pixel, where
        F(2x2, 5x5) would do 1.4x the multiply-adds."""
        top, bottom, left, right = pad4(self.padding)
        shape_ok = (self.kernel_size == (3, 3)
                    or (self.kernel_size == (5, 5) and (top, bottom, left, right) == (2, 2, 2, 2))
                    or (self.kernel_size in ((1, 3), (1, 7)) and not (top or bottom))
                    or (self.kernel_size in ((3, 1), (7, 1)) and not (left or right)))
        return self.algorithm == "winograd" and shape_ok and self.stride in (1, (1, 1)) and self.ops.HAS_WINOGRAD

    def set_algorithm(self, algorithm):
        self.algorithm = algorithm
        self.use(self.ops)

    def is_pointwise(self):
        """A 1x1 conv at stride 1 without padding: a per-pixel matrix product (fusion.py)."""
        return self.kernel_size == (1, 1) and pair(self.stride) == (1, 1) and pad4(self.padding) == (0, 0, 0, 0)

    def output_shape(self, shape):
        N, H, W, _ = shape
        OH, OW = conv_output_hw(H, W, self.kernel_size, pair(self.stride), pad4(self.padding))
        return N, OH, OW, self.out_channels

    def __call__(self, x, taps, out=None):
        if self.winograd is not None:
            y = self.ops.conv2d_winograd(x, self.winograd, self.bias, self.padding, relu=True, out=out,
                                         kernel_size=self.kernel_size)
        else:
            y = self.ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, relu=True, out=out)
        return taps.record(self.name, y)

    def direct(self, x, taps, out=None):
        """The conv by im2col whatever the algorithm: the backward differentiates the direct
        convolution, as accurate as torch's in float32. A Winograd forward's larger rounding
        flips more ReLU decisions near 0: on v3 the input gradient of a logit came 10x as far
        from float64 as torch float32's, where im2col came 1.8x (benchmarks/NOTES.md). A
        fused member, or a Winograd layer, runs from its host filters."""
        weight = self.weight if self.weight is not None else self.host_filters()
        y = self.ops.conv2d(x, weight, self.bias, self.stride, self.padding, relu=True, out=out)
        return taps.record(self.name, y)

    def host_filters(self):
        """The folded HWIO filters, wherever this layer holds them (host copy or CPU panels)."""
        if self.folded is not None and self.folded[0] is not None:
            return self.folded[0]
        if self.weight is not None and hasattr(self.weight, "unpack"):
            return self.weight.unpack()
        raise PyinceptError(f"{self.name} holds its filters in the Winograd domain only: "
                            "the network reloads them before a backward pass")

    def vjp(self, x, y, dy, grads=None):
        """ReLU, then the conv's linear part, backwards: dx. With `grads`, the gradients of
        the checkpoint's own conv weight, bn weight and bn bias, the running statistics
        frozen (eval-mode batch norm): `fold_batchnorm_vjp` maps the folded conv's onto them."""
        g = self.ops.relu_vjp(dy, y)
        dx, dw, db = self.ops.conv2d_vjp(g, x, self.host_filters(), self.stride, self.padding, params=grads is not None)
        if grads is not None:
            gamma, mean, var = self.bn
            raw = self.raw_filters()
            dw, dgamma, dbeta = fold_batchnorm_vjp(np.asarray(dw), np.asarray(db), raw, gamma, mean, var, self.eps)
            grads[f"{self.name}.conv.weight"] = dw.astype(np.float32)
            grads[f"{self.name}.bn.weight"] = dgamma.astype(np.float32)
            grads[f"{self.name}.bn.bias"] = dbeta.astype(np.float32)
        return dx

    def raw_filters(self):
        """The checkpoint's conv weight, before folding: the folded filters over the scale
        (in float64: within an ulp of the file's, enough for the gamma gradient they weigh)."""
        gamma, mean, var = self.bn
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + self.eps)
        if np.any(scale == 0):
            raise PyinceptError(f"{self.name}: a batch-norm weight of 0 folds its filters away; "
                                "their gradient cannot be recovered from the folded conv")
        return self.host_filters().astype(np.float64) / scale


class Linear(Layer):
    """y = x @ w + b, with w stored (in, out). A (N, H, W, C) input is flattened first.

    torch flattens NCHW activations, so a layer fed a map bigger than 1x1 (GoogLeNet's aux
    heads: 4x4x128) reads its input features in (C, H, W) order; `input_chw` reorders the
    weight rows once, at load time, into the (H, W, C) order NHWC activations flatten in.
    """

    def __init__(self, name, in_features, out_features, relu=False, input_chw=None):
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.relu = relu
        self.input_chw = input_chw
        self.host = None                  # (weight (in, out), bias (out,)) on the host
        self.weight = self.bias = None    # the same, on the device `ops` runs on

    def parameter_shapes(self):
        return {f"{self.name}.weight": (self.in_features, self.out_features), f"{self.name}.bias": (self.out_features,)}

    def load(self, params, lean=False):
        weight, bias = (np.ascontiguousarray(params[f"{self.name}.{f}"], np.float32) for f in ("weight", "bias"))
        if self.input_chw is not None:
            C, H, W = self.input_chw                                       # rows (c, h, w) -> (h, w, c)
            weight = np.ascontiguousarray(weight.reshape(C, H, W, -1).transpose(1, 2, 0, 3).reshape(weight.shape))
        self.host = (weight, bias)
        self.use(self.ops)
        if lean:
            self.keep_kernel_form_only()

    def use(self, ops):
        self.ops = ops
        if self.host is not None:
            if self.host[0] is None:
                raise PyinceptError(f"{self.name} holds its weights in its kernel's form only: "
                                    "switch the device through the network, which reloads them")
            self.weight, self.bias = ops.pack_weights(self.host[0]), ops.to_device(self.host[1])

    def keep_kernel_form_only(self):
        """Let go of the host weight where the kernel runs from a form of its own (the CPU's
        panels, a GPU copy); `Network.reload` brings it back."""
        if self.host is not None and self.host[0] is not None and self.weight is not self.host[0]:
            self.host = (None, self.host[1])

    def holds_host_weight(self):
        return self.host is None or self.host[0] is not None

    def output_shape(self, shape):
        return shape[0], self.out_features

    def __call__(self, x, taps, out=None):
        y = self.ops.linear(x.reshape(x.shape[0], -1), self.weight, self.bias)     # (N, out)
        if self.relu:
            y = self.ops.relu(y)
        return taps.record(self.name, y)

    def vjp(self, x, y, dy, grads=None):
        """dx (shaped like x), and with `grads` the checkpoint's weight (in, out) and bias."""
        if self.relu:
            dy = self.ops.relu_vjp(dy, y)
        weight = self.weight if self.weight is not None else self.host[0]
        dx, dw, db = self.ops.linear_vjp(dy, x.reshape(x.shape[0], -1), weight, params=grads is not None)
        if grads is not None:
            dw = np.asarray(self.ops.to_host(dw), np.float32)
            if self.input_chw is not None:                                  # rows (h, w, c) -> the file's (c, h, w)
                C, H, W = self.input_chw
                dw = np.ascontiguousarray(dw.reshape(H, W, C, -1).transpose(2, 0, 1, 3).reshape(dw.shape))
            grads[f"{self.name}.weight"] = dw
            grads[f"{self.name}.bias"] = np.asarray(self.ops.to_host(db), np.float32)
        return dx.reshape(x.shape)


class Pool(Layer):
    """A parameter-free step: a pooling kernel, by its name in the kernel set, with fixed settings.

    `name` may be None for a pool that torchvision writes inline in `forward` (v3's
    `F.avg_pool2d(x, 3, 1, 1)` before branch_pool): it then has no tap of its own.
    """

    def __init__(self, name, kernel, **settings):
        self.name, self.kernel, self.settings = name, kernel, settings

    def output_shape(self, shape):
        N, H, W, C = shape
        if self.kernel == "global_avg_pool2d":
            return N, 1, 1, C
        if self.kernel == "adaptive_avg_pool2d":
            return (N, *pair(self.settings["output_size"]), C)
        k = pair(self.settings["kernel_size"])
        s = pair(self.settings.get("stride") or self.settings["kernel_size"])
        p = pair(self.settings.get("padding", 0))
        ceil = self.settings.get("ceil_mode", False)
        return N, pool_output_size(H, k[0], s[0], p[0], ceil), pool_output_size(W, k[1], s[1], p[1], ceil), C

    def __call__(self, x, taps, out=None):
        kernel = getattr(self.ops, self.kernel)
        y = kernel(x, **self.settings, out=out) if out is not None else kernel(x, **self.settings)
        return taps.record(self.name, y)

    def vjp(self, x, y, dy, grads=None):
        """The pool's own vjp kernel (`max_pool2d_vjp`: the first maximum of each window)."""
        return getattr(self.ops, self.kernel + "_vjp")(dy, x, **self.settings)


def avg_pool(kernel_size, stride=None, padding=0, count_include_pad=True, name=None):
    return Pool(name, "avg_pool2d", kernel_size=kernel_size, stride=stride, padding=padding,
                count_include_pad=count_include_pad)


def max_pool(kernel_size, stride=None, padding=0, ceil_mode=False, name=None):
    return Pool(name, "max_pool2d", kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode)


class Split(Layer):
    """Two or more layers on the same input, outputs side by side: v3's expanded filter banks
    (Mixed_7b-c), where a 1x3 and a 3x1 conv both read one tensor and both join the concat."""

    def __init__(self, *layers):
        self.layers = layers

    def output_shape(self, shape):
        shapes = [layer.output_shape(shape) for layer in self.layers]
        return (*shapes[0][:3], sum(s[3] for s in shapes))

    def __call__(self, x, taps, out=None, direct=False):
        if out is None:
            out = self.ops.empty(self.output_shape(x.shape))
        for layer, dst in zip(self.layers, channel_slices(out, [layer.out_channels for layer in self.layers])):
            (layer.direct if direct else layer)(x, taps, out=dst)
        return out

    def direct(self, x, taps, out=None):
        return self(x, taps, out, direct=True)

    def vjp(self, x, y, dy, grads=None, cotangents=None):
        """Each layer's share of dy, back through it; both read x, so their dx add up."""
        widths = [layer.out_channels for layer in self.layers]
        dx = None
        for layer, y_i, dy_i in zip(self.layers, channel_slices(y, widths), self.ops.concat_channels_vjp(dy, widths)):
            dy_i = _plus(dy_i, (cotangents or {}).get(layer.name), layer.name)
            part = layer.vjp(x, y_i, dy_i, grads)
            dx = part if dx is None else dx + part
        return dx


def channel_slices(out, widths):
    """Split a (N, H, W, sum(widths)) buffer into consecutive channel views, one per branch."""
    views, k0 = [], 0
    for width in widths:
        views.append(out[..., k0 : k0 + width])
        k0 += width
    assert k0 == out.shape[3]
    return views


class Block(Layer):
    """A named group of layers, loaded and listed together: every attribute that is a layer.

    An Inception module sets `self.branches`, torchvision's `forward` as data: one list of
    steps per branch, in order, each step a layer called as step(y, taps[, out]). Calling
    the block runs every branch on the input, the last step of each into its channel slice
    of the output. `plan` (fusion.py), when set, computes some branches' first steps
    together and the block carries on from there.
    """

    branches = None
    chain = None           # or: one list of steps run in turn, no concatenation (the aux heads)
    plan = None

    def __init__(self, name):
        self.name = name

    def layers(self):
        """The weighted layers (BasicConv2d, Linear), in the order the attributes were set."""
        return [v for v in vars(self).values() if isinstance(v, (BasicConv2d, Linear))]

    def steps(self):
        """Every layer the block calls, pools included: branch by branch, then the rest."""
        found = []
        candidates = [inner for branch in self._tables() for step in branch
                      for inner in (step, *(step.layers if isinstance(step, Split) else ()))]
        for step in candidates + [v for v in vars(self).values() if isinstance(v, Layer)]:
            if all(step is not f for f in found):
                found.append(step)
        return found

    def use(self, ops):
        self.ops = ops
        for step in self.steps():
            step.use(ops)
        if self.plan is not None:
            self.plan.use(ops)

    def parameter_shapes(self):
        shapes = {}
        for layer in self.layers():
            shapes.update(layer.parameter_shapes())
        return shapes

    def load(self, params, lean=False):
        for layer in self.layers():
            layer.load(params, lean)
        if self.plan is not None:
            self.plan.load(lean)

    def _tables(self):
        """The step lists the block runs: its branches, or its chain as one."""
        return [self.chain] if self.chain is not None else list(self.branches or ())

    def layer_names(self):
        """Every tap inside the block, in the order a branch table lists them."""
        return [name for step in self.steps() for name in step.layer_names()]

    def _conv(self, branch, *args, **kwargs):
        return BasicConv2d(f"{self.name}.{branch}", *args, **kwargs)

    def output_shape(self, shape):
        if self.chain is not None:
            return self._branch_shape(self.chain, shape)
        shapes = [self._branch_shape(branch, shape) for branch in self.branches]
        return (*shapes[0][:3], sum(s[3] for s in shapes))

    @staticmethod
    def _branch_shape(branch, shape):
        for step in branch:
            shape = step.output_shape(shape)
        return shape

    def __call__(self, x, taps):
        if self.chain is not None:
            for step in self.chain:
                x = step(x, taps)
            return taps.record(self.name, x)
        shapes = [self._branch_shape(branch, x.shape) for branch in self.branches]
        out = self.ops.empty((*shapes[0][:3], sum(s[3] for s in shapes)))    # every branch's slice
        slices = channel_slices(out, [s[3] for s in shapes])
        started = self.plan(x, taps, slices) if self.plan is not None else {}
        for i, (branch, dst) in enumerate(zip(self.branches, slices)):
            y, done = started.get(i, (x, 0))                                 # (its input, steps already run)
            for step in branch[done:-1]:
                y = step(y, taps)
            if done < len(branch):
                branch[-1](y, taps, out=dst)
        return taps.record(self.name, out)

    def record(self, x):
        """The forward as the backward needs it: (output, [each branch's activations: its
        input, then every step's output]), every step `direct`. It runs the branch table
        itself, never the fused plan, whose pooled branch pools after its conv: the backward
        differentiates the readable definition. The im2col matrices are not kept;
        conv2d_vjp unfolds again."""
        taps = Taps()
        if self.chain is not None:
            acts = [x]
            for step in self.chain:
                acts.append(step.direct(acts[-1], taps))
            return acts[-1], [acts]
        shapes = [self._branch_shape(branch, x.shape) for branch in self.branches]
        out = self.ops.empty((*shapes[0][:3], sum(s[3] for s in shapes)))
        activations = []
        for branch, dst in zip(self.branches, channel_slices(out, [s[3] for s in shapes])):
            acts = [x]
            for step in branch[:-1]:
                acts.append(step.direct(acts[-1], taps))
            acts.append(branch[-1].direct(acts[-1], taps, out=dst))
            activations.append(acts)
        return out, activations

    def direct(self, x, taps, out=None):
        return taps.record(self.name, self.record(x)[0])

    def vjp(self, x, y, dy, grads=None, cotangents=None, activations=None):
        """dx: each branch's channels of dy back through its steps in reverse, the branches'
        dx summed (they all read x). cotangents: {layer name inside the block: dL/d(its
        output)}, added where that output is. activations: `record`'s, else the block
        replays its forward from x (only the module's input was kept: checkpoint="blocks")."""
        if activations is None:
            y, activations = self.record(x)
        cotangents = cotangents or {}
        if self.chain is not None:
            shares = [dy]
        else:
            shares = self.ops.concat_channels_vjp(dy, [acts[-1].shape[3] for acts in activations])
        dx = None
        for branch, acts, g in zip(self._tables(), activations, shares):
            for j in range(len(branch) - 1, -1, -1):
                step = branch[j]
                g = _plus(g, cotangents.get(step.name), step.name) if step.name else g
                if isinstance(step, Split):
                    g = step.vjp(acts[j], acts[j + 1], g, grads, cotangents)
                else:
                    g = step.vjp(acts[j], acts[j + 1], g, grads)
            dx = g if dx is None else dx + g
        return dx


def _plus(g, cotangent, name):
    """g + the cotangent given at layer `name`'s output (None: g as it is)."""
    if cotangent is None:
        return g
    if cotangent.shape != g.shape:
        raise PyinceptError(f"the cotangent for {name} is {cotangent.shape}; {name}'s output is {tuple(g.shape)}")
    return g + cotangent
