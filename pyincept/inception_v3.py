"""Inception v3, the network: one table of stages, in the order data flows through them.

Follows Szegedy et al., "Rethinking the Inception Architecture for Computer Vision"
(2015), table 1, as torchvision implements it (`torchvision.models.inception_v3`):
same names, same channel counts, same paddings, so torchvision's checkpoint maps
key for key. Input is NHWC float32 `(N, H, W, 3)`, exactly the tensor torchvision's
network sees with `transform_input=False` (for the published weights that means
ImageNet-normalised pixels then torchvision's `transform_input`, i.e. [-1, 1]-ish;
preprocessing lives outside the model). Output is logits `(N, 1000)`.

What it is not: a training framework. Dropout is the identity here (inference),
and batch norm is folded into the convolutions when weights load.

    model = pyincept.inception_v3("weights.npz")
    logits = model(x)                                     # (N, 1000)
    out = model.run(x, ["Mixed_5b.branch_pool", "fc", "AuxLogits"])
    out["Mixed_5b.branch_pool"]                           # (N, 35, 35, 32) at 299x299
"""

import numpy as np

from . import kernels
from .blocks import (
    BasicConv2d,
    Block,
    Layer,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
    Linear,
    Taps,
)
from .errors import PyinceptError, WeightsError
from .weights import check_parameters, load_weights

NUM_CLASSES = 1000
MIN_SIZE = 75  # torchvision's Inception_V3_Weights meta: min_size (75, 75)
DEFAULT_SEED = 0
ALGORITHMS = ("winograd", "im2col")


class Pool(Layer):
    """A parameter-free stage: a pooling kernel (by its name in the kernel set) with fixed settings."""

    def __init__(self, name, kernel, **settings):
        self.name, self.kernel, self.settings = name, kernel, settings

    def parameter_shapes(self):
        return {}

    def load(self, params):
        pass

    def layer_names(self):
        return []

    def __call__(self, x, taps):
        return taps.record(self.name, getattr(self.ops, self.kernel)(x, **self.settings))


class Inception3:
    """Inception v3 for inference. Build it with `pyincept.inception_v3(...)`."""

    def __init__(self, num_classes=NUM_CLASSES, fuse=True, algorithm="winograd"):
        # One stage per line, as in the paper's table; shapes for a 299x299x3 input.
        self.stages = [
            BasicConv2d("Conv2d_1a_3x3", 3, 32, 3, stride=2),           # 149x149x32
            BasicConv2d("Conv2d_2a_3x3", 32, 32, 3),                   # 147x147x32
            BasicConv2d("Conv2d_2b_3x3", 32, 64, 3, padding=1),        # 147x147x64
            Pool("maxpool1", "max_pool2d", kernel_size=3, stride=2),   # 73x73x64
            BasicConv2d("Conv2d_3b_1x1", 64, 80, 1),                   # 73x73x80
            BasicConv2d("Conv2d_4a_3x3", 80, 192, 3),                  # 71x71x192
            Pool("maxpool2", "max_pool2d", kernel_size=3, stride=2),   # 35x35x192
            InceptionA("Mixed_5b", 192, pool_features=32),             # 35x35x256
            InceptionA("Mixed_5c", 256, pool_features=64),             # 35x35x288
            InceptionA("Mixed_5d", 288, pool_features=64),             # 35x35x288
            InceptionB("Mixed_6a", 288),                               # 17x17x768
            InceptionC("Mixed_6b", 768, channels_7x7=128),             # 17x17x768
            InceptionC("Mixed_6c", 768, channels_7x7=160),             # 17x17x768
            InceptionC("Mixed_6d", 768, channels_7x7=160),             # 17x17x768
            InceptionC("Mixed_6e", 768, channels_7x7=192),             # 17x17x768
            InceptionD("Mixed_7a", 768),                               # 8x8x1280
            InceptionE("Mixed_7b", 1280),                              # 8x8x2048
            InceptionE("Mixed_7c", 2048),                              # 8x8x2048
            Pool("avgpool", "global_avg_pool2d"),                      # 1x1x2048
            Linear("fc", 2048, num_classes),                           # 1000
        ]
        # The auxiliary head branches off Mixed_6e's output; run only when asked for.
        self.AuxLogits = InceptionAux("AuxLogits", 768, num_classes)   # 1000
        self.num_classes = num_classes
        self.meta = {}
        self.ops = kernels
        self.set_fuse(fuse)
        self.set_algorithm(algorithm)

    def set_fuse(self, fuse):
        """fuse=True: each module's 1x1 convs share one GEMM (blocks.Fused1x1); False: torchvision's order."""
        for part in self.parts():
            if isinstance(part, Block) and part.pointwise is not None:
                part.pointwise.fused = bool(fuse)
        return self

    def set_algorithm(self, algorithm):
        """How the stride-1 3x3, 5x5, 1x3, 3x1, 1x7 and 7x1 convs run: "winograd" (F(2x2, 3x3)
        or F(4x4, 3x3), F(2x2, 5x5), F(4, 3), F(2, 7): 2.25x or 4x, 2.8x, 2x, 1.75x fewer
        multiply-adds, within float rounding of im2col; the CPU's default) or "im2col" (the
        readable path).
        Devices without a Winograd kernel (CUDA) run im2col either way."""
        if algorithm not in ALGORITHMS:
            raise PyinceptError(f"unknown algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
        for layer in self.conv_layers():
            layer.set_algorithm(algorithm)
        self.algorithm = algorithm
        return self

    def conv_layers(self):
        """Every BasicConv2d, stages and aux head alike."""
        layers = []
        for part in self.parts():
            layers.extend(part.layers() if isinstance(part, Block) else [part])
        return [layer for layer in layers if isinstance(layer, BasicConv2d)]

    def to(self, device):
        """Run on "cpu" or "cuda": weights move to the device once; later calls move only x and the outputs."""
        ops = kernels.backend(device)
        for part in self.parts():
            part.use(ops)
        self.ops = ops
        return self

    # --- parameters ------------------------------------------------------------

    def parts(self):
        """Every stage and the aux head, in torchvision's order (the aux head follows Mixed_6e)."""
        i = [s.name for s in self.stages].index("Mixed_6e") + 1
        return self.stages[:i] + [self.AuxLogits] + self.stages[i:]

    def parameter_shapes(self):
        """{checkpoint key: shape in pyincept layout} for every parameter, in checkpoint order."""
        shapes = {}
        for part in self.parts():
            shapes.update(part.parameter_shapes())
        return shapes

    def load_parameters(self, params, source="weights", meta=None):
        """Check keys and shapes against the architecture, then fold BN and keep the weights."""
        check_parameters(params, self.parameter_shapes(), source)
        for part in self.parts():
            part.load(params)
        self.meta = dict(meta or {})
        return self   # each layer moved its weights to the device it already runs on

    # --- names -----------------------------------------------------------------

    def layer_names(self):
        """Every name `run` accepts, in execution order (AuxLogits and its layers after Mixed_6e)."""
        names = []
        for part in self.parts():
            if isinstance(part, Block):
                names.extend(part.layer_names())
            names.append(part.name)
        return names

    # --- forward ---------------------------------------------------------------

    def __call__(self, x):
        """Logits (N, num_classes) for an NHWC float32 batch (N, H, W, 3)."""
        return self.run(x, ["fc"])["fc"]

    def run(self, x, outputs=("fc",)):
        """Run the network as far as needed and return {name: NHWC array} for each name.

        Names are dotted torchvision names: a stage (`Mixed_6e`, `avgpool`, `fc`), a
        layer inside one (`Mixed_5b.branch_pool`, `Mixed_7b.branch3x3_2a`), or the aux
        head (`AuxLogits`, `AuxLogits.conv1`). Stops after the last stage needed.
        A batch runs in micro-batches spread over the device's threads
        (`kernels.map_batch`); the outputs are joined back along the batch axis.
        """
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        x = self._check_input(x)
        known = self.layer_names()
        for name in outputs:
            if name not in known:
                raise PyinceptError(f"unknown layer {name!r}; `pyincept layers` lists the names")
        parts = self.ops.map_batch(lambda batch: self._run(x[batch], outputs), len(x))
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in outputs}

    def _run(self, x, outputs):
        """`run` for one micro-batch, on the thread that calls it."""
        taps = Taps(outputs, to_host=self.ops.to_host)
        x = self.ops.to_device(x)
        stage_names = [s.name for s in self.stages]
        want_aux = any(n.split(".")[0] == "AuxLogits" for n in outputs)
        last = max(
            stage_names.index("Mixed_6e" if n.split(".")[0] == "AuxLogits" else n.split(".")[0])
            for n in outputs
        )
        for stage in self.stages[: last + 1]:
            if stage.name == "fc":
                x = x.reshape(x.shape[0], -1)                                  # (N, 2048)
            x = stage(x, taps)
            if stage.name == "Mixed_6e" and want_aux:
                self.AuxLogits(x, taps)
        return {name: taps.outputs[name] for name in outputs}

    @property
    def device(self):
        return getattr(self.ops, "DEVICE", "cpu")

    def _check_input(self, x):
        if self.stages[0].weight is None:
            raise WeightsError("model has no weights loaded")
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[3] != 3:
            raise PyinceptError(f"input must be NHWC (N, H, W, 3), got shape {x.shape}")
        if x.shape[1] < MIN_SIZE or x.shape[2] < MIN_SIZE:
            raise PyinceptError(f"input is {x.shape[1]}x{x.shape[2]}; Inception v3 needs at least {MIN_SIZE}x{MIN_SIZE}")
        return np.ascontiguousarray(x, dtype=np.float32)


def parameter_shapes(num_classes=NUM_CLASSES):
    """The Inception v3 parameter table: {checkpoint key: shape in pyincept layout}."""
    return Inception3(num_classes).parameter_shapes()


def random_parameters(seed=DEFAULT_SEED, num_classes=NUM_CLASSES):
    """Deterministic random weights, for study and benchmarks.

    He-normal convolutions (std sqrt(2 / fan_in)) with identity batch norm keep
    activations O(1) through all 94 convolutions; torchvision's truncated normal
    with std 0.1 would grow them to ~1e12 without calibrated BN statistics.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in parameter_shapes(num_classes).items():
        if key.endswith((".bn.weight", ".bn.running_var")):
            value = np.ones(shape)
        elif key.endswith((".bn.bias", ".bn.running_mean")) or (key.endswith(".bias") and len(shape) == 1):
            value = np.zeros(shape)
        else:
            fan_in = int(np.prod(shape[:-1]))                 # HWIO or (in, out): all but the last axis
            gain = 2.0 if ".conv." in key else 1.0
            value = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
        params[key] = value.astype(np.float32)
    return params


def inception_v3(weights=None, seed=DEFAULT_SEED, device="cpu", fuse=True, algorithm="winograd"):
    """Build Inception v3.

    weights: None for a deterministic random init (`seed`), or the path of a pyincept
    weight file (`.npz`, made by `pyincept convert` or `pyincept weights fetch`).
    device: "cpu", or "cuda" (needs an NVIDIA GPU and the `cuda` extra).
    fuse: share one GEMM between each module's 1x1 convs (exact up to float rounding).
    algorithm: "winograd" or "im2col" for the stride-1 3x3, 5x5, 1x3, 3x1, 1x7 and 7x1 convs
        (Inception3.set_algorithm).
    """
    model = Inception3(fuse=fuse, algorithm=algorithm)
    if weights is None:
        model.load_parameters(random_parameters(seed), source=f"random init (seed {seed})", meta={"random_seed": seed})
    else:
        params, meta = load_weights(weights)
        model.load_parameters(params, source=str(weights), meta=meta)
    return model.to(device) if device != "cpu" else model
