"""Inception v3, the network: one table of stages, in the order data flows through them,
with its modules InceptionA-E and the auxiliary head beside it.

Follows Szegedy et al., "Rethinking the Inception Architecture for Computer Vision"
(2015), table 1, as torchvision implements it (`torchvision/models/inception.py`): same
names, same channel counts, same paddings, so torchvision's checkpoint maps key for key.
Input is NHWC float32 `(N, H, W, 3)`, exactly the tensor torchvision's network sees with
`transform_input=False` (for the published weights: ImageNet-normalised pixels, then
torchvision's `transform_input`, which the weights' recipe applies; see registry.py).
Output is logits `(N, 1000)`. Running, tapping and loading are network.py's.

    model = pyincept.inception_v3("weights.npz")
    logits = model(x)                                     # (N, 1000)
    out = model.run(x, ["Mixed_5b.branch_pool", "fc", "AuxLogits"])
    out["Mixed_5b.branch_pool"]                           # (N, 35, 35, 32) at 299x299

Each module's `branches` is torchvision's `forward` written as a table; the comments give
the shapes for a 299x299 input. The blog post in shared/seed counts the eleven modules.
"""

from ..layers import BasicConv2d, Block, Linear, Pool, Split, avg_pool, max_pool
from .network import Network
from .spec import ModelSpec, WeightSet

NUM_CLASSES = 1000
MIN_SIZE = 75  # torchvision's Inception_V3_Weights meta: min_size (75, 75)


class InceptionA(Block):
    """35x35 module (Mixed_5b-d): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    pool = staticmethod(avg_pool)   # F.avg_pool2d(x, 3, 1, 1) in torchvision's forward; FID's variant overrides it

    def __init__(self, name, in_channels, pool_features):
        super().__init__(name)
        self.branch1x1 = self._conv("branch1x1", in_channels, 64, 1)
        self.branch5x5_1 = self._conv("branch5x5_1", in_channels, 48, 1)
        self.branch5x5_2 = self._conv("branch5x5_2", 48, 64, 5, padding=2)
        self.branch3x3dbl_1 = self._conv("branch3x3dbl_1", in_channels, 64, 1)
        self.branch3x3dbl_2 = self._conv("branch3x3dbl_2", 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = self._conv("branch3x3dbl_3", 96, 96, 3, padding=1)
        self.branch_pool = self._conv("branch_pool", in_channels, pool_features, 1)
        self.branches = [
            [self.branch1x1],                                                    # 35x35x64
            [self.branch5x5_1, self.branch5x5_2],                                # 35x35x48 -> 64
            [self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3],     # 35x35x64 -> 96 -> 96
            [self.pool(3, stride=1, padding=1), self.branch_pool],               # 35x35xC -> pool_features
        ]


class InceptionB(Block):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    def __init__(self, name, in_channels):
        super().__init__(name)
        self.branch3x3 = self._conv("branch3x3", in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = self._conv("branch3x3dbl_1", in_channels, 64, 1)
        self.branch3x3dbl_2 = self._conv("branch3x3dbl_2", 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = self._conv("branch3x3dbl_3", 96, 96, 3, stride=2)
        self.branches = [
            [self.branch3x3],                                                    # 17x17x384
            [self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3],     # 35x35x64 -> 96 -> 17x17x96
            [max_pool(3, stride=2)],                                             # 17x17x288
        ]


class InceptionC(Block):
    """17x17 module (Mixed_6b-e), 7x7 factorised into 1x7 and 7x1:
    1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avgpool->1x1."""

    pool = staticmethod(avg_pool)   # F.avg_pool2d(x, 3, 1, 1); FID's variant overrides it

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
        self.branches = [
            [self.branch1x1],                                                    # 17x17x192
            [self.branch7x7_1, self.branch7x7_2, self.branch7x7_3],              # c7 -> c7 -> 192
            [self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
             self.branch7x7dbl_4, self.branch7x7dbl_5],                          # c7 x4 -> 192
            [self.pool(3, stride=1, padding=1), self.branch_pool],               # 17x17x192
        ]


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
        self.branches = [
            [self.branch3x3_1, self.branch3x3_2],                                # 17x17x192 -> 8x8x320
            [self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
             self.branch7x7x3_4],                                                # 192 x3 -> 8x8x192
            [max_pool(3, stride=2)],                                             # 8x8x768
        ]


class InceptionE(Block):
    """8x8 module (Mixed_7b-c), expanded filter banks: 1x1 | 1x1->(1x3 and 3x1) |
    1x1->3x3->(1x3 and 3x1) | avgpool->1x1. Each split branch fills two slices."""

    pool = staticmethod(avg_pool)   # F.avg_pool2d(x, 3, 1, 1); FID's variants override it

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
        self.branches = [
            [self.branch1x1],                                                    # 8x8x320
            [self.branch3x3_1, Split(self.branch3x3_2a, self.branch3x3_2b)],     # 384 -> 384 + 384
            [self.branch3x3dbl_1, self.branch3x3dbl_2,
             Split(self.branch3x3dbl_3a, self.branch3x3dbl_3b)],                 # 448 -> 384 -> 384 + 384
            [self.pool(3, stride=1, padding=1), self.branch_pool],               # 8x8x192
        ]


class InceptionAux(Block):
    """The auxiliary classifier on Mixed_6e (a training-time regulariser in the paper):
    avgpool 5/3 -> 1x1 conv -> 5x5 conv -> global avgpool -> fc."""

    def __init__(self, name, in_channels, num_classes):
        super().__init__(name)
        self.conv0 = self._conv("conv0", in_channels, 128, 1)
        self.conv1 = self._conv("conv1", 128, 768, 5)
        self.fc = Linear(f"{name}.fc", 768, num_classes)
        self.chain = [
            avg_pool(5, stride=3),                                           # 5x5x768
            self.conv0,                                                      # 5x5x128
            self.conv1,                                                      # 1x1x768
            Pool(None, "global_avg_pool2d"),                                 # 1x1x768
            self.fc,                                                         # 1000
        ]


# The names of TensorFlow's 2015-12-05 Inception graph (the one the seed's post opened, and
# the FID tools' network): `mixed` .. `mixed_10` are Mixed_5b .. Mixed_7c, `mixed_7/join`
# is mixed_7's concatenated output, `pool_3` the 2048-d pool FID uses. Any of them also
# with a tensor's ":0". `softmax` is the logits through softmax.
TF_GRAPH_NAMES = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "pool": "maxpool1",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3", "pool_1": "maxpool2",
    **{("mixed" if i == 0 else f"mixed_{i}"): name for i, name in enumerate(
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
         "Mixed_7a", "Mixed_7b", "Mixed_7c"])},
    "mixed/tower_2/conv": "Mixed_5b.branch_pool",        # the seed's 35x35x32 picture
    "mixed_7/join": "Mixed_6e",
    "pool_3": "avgpool",
    "softmax": "softmax",
}


class Inception3(Network):
    """Inception v3 for inference. Build it with `pyincept.inception_v3(...)`."""

    title = "Inception v3"
    min_size = (MIN_SIZE, MIN_SIZE)
    aliases = TF_GRAPH_NAMES

    # The module classes by kind; the FID variant (inception_v3_fid.py) swaps in its patched
    # ones, as pytorch-fid and tinygrad do (tinygrad's `cls_map`).
    blocks = {"A": None, "C": None, "E_1": None, "E_2": None}

    def __init__(self, num_classes=NUM_CLASSES, fuse=True, algorithm="winograd", aux_logits=True):
        A, C = self.blocks["A"] or InceptionA, self.blocks["C"] or InceptionC
        E_1, E_2 = self.blocks["E_1"] or InceptionE, self.blocks["E_2"] or InceptionE
        # One stage per line, as in the paper's table; shapes for a 299x299x3 input.
        stages = [
            BasicConv2d("Conv2d_1a_3x3", 3, 32, 3, stride=2),           # 149x149x32
            BasicConv2d("Conv2d_2a_3x3", 32, 32, 3),                   # 147x147x32
            BasicConv2d("Conv2d_2b_3x3", 32, 64, 3, padding=1),        # 147x147x64
            Pool("maxpool1", "max_pool2d", kernel_size=3, stride=2),   # 73x73x64
            BasicConv2d("Conv2d_3b_1x1", 64, 80, 1),                   # 73x73x80
            BasicConv2d("Conv2d_4a_3x3", 80, 192, 3),                  # 71x71x192
            Pool("maxpool2", "max_pool2d", kernel_size=3, stride=2),   # 35x35x192
            A("Mixed_5b", 192, pool_features=32),             # 35x35x256
            A("Mixed_5c", 256, pool_features=64),             # 35x35x288
            A("Mixed_5d", 288, pool_features=64),             # 35x35x288
            InceptionB("Mixed_6a", 288),                               # 17x17x768
            C("Mixed_6b", 768, channels_7x7=128),             # 17x17x768
            C("Mixed_6c", 768, channels_7x7=160),             # 17x17x768
            C("Mixed_6d", 768, channels_7x7=160),             # 17x17x768
            C("Mixed_6e", 768, channels_7x7=192),             # 17x17x768
            InceptionD("Mixed_7a", 768),                               # 8x8x1280
            E_1("Mixed_7b", 1280),                              # 8x8x2048
            E_2("Mixed_7c", 2048),                              # 8x8x2048
            Pool("avgpool", "global_avg_pool2d"),                      # 1x1x2048
            Linear("fc", 2048, num_classes),                           # 1000
        ]
        # The auxiliary head reads Mixed_6e's output; it runs only when asked for.
        aux = {"AuxLogits": (InceptionAux("AuxLogits", 768, num_classes), "Mixed_6e")} if aux_logits else {}
        self._finish(stages, aux, num_classes, fuse, algorithm)


# torchvision's port of Google's checkpoint (weights/README.md), and its recipe for
# Inception_V3_Weights.IMAGENET1K_V1: ImageClassification(crop_size=299, resize_size=342),
# then its `transform_input`, which maps ImageNet-normalised pixels to the [-1, 1] range
# Google's network was trained on. Written into every converted weight file's metadata.
SPEC = ModelSpec(
    name="inception_v3",
    title="Inception v3",
    paper="Szegedy et al. 2015, Rethinking the Inception Architecture for Computer Vision",
    network=Inception3,
    input_size=(299, 299),
    min_size=(MIN_SIZE, MIN_SIZE),
    num_classes=NUM_CLASSES,
    weights=(
        WeightSet(
            name="IMAGENET1K_V1",
            url="https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
            sha256_prefix="0cc3c7bd",
            preprocessing={
                "resize_size": 342,          # shorter side, bilinear, antialiased
                "crop_size": 299,            # centre crop
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
                "transform_input": True,     # x * std / 0.5 + (mean - 0.5) / 0.5, per channel
            },
        ),
    ),
)
Inception3.spec = SPEC
