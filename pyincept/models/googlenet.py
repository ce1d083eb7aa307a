"""GoogLeNet (Inception v1), the network: its Inception module, auxiliary heads and the table
of stages, in the order data flows through them.

Follows Szegedy et al. 2014, "Going deeper with convolutions", table 1, where the Inception
module first appears: four branches on one input, 1x1 | 1x1->3x3 | 1x1->5x5 |
3x3 max-pool->1x1, concatenated along channels; the 1x1s before the larger convs cut the
channels first ("dimension reduction", section 4). Built as torchvision builds it
(`torchvision/models/googlenet.py`): same names, channel counts and paddings, batch norm
after every conv, so its checkpoint (`googlenet-1378be20.pth`) maps key for key.

Input is NHWC float32 `(N, H, W, 3)`, the tensor torchvision's network sees with
`transform_input=False`; the published weights' recipe (resize 256, centre crop 224, then
`transform_input`) is this file's SPEC. Output is logits `(N, 1000)`.

    model = pyincept.googlenet("googlenet.npz")
    out = model.run(x, ["inception4a.branch4.1", "aux1", "fc"])
    out["inception4a.branch4.1"]                          # (N, 14, 14, 64) at 224x224

Shapes in the comments are for a 224x224 input.
"""

from ..layers import BasicConv2d, Block, Linear, Pool, max_pool
from .network import Network
from .spec import ModelSpec, WeightSet

NUM_CLASSES = 1000
MIN_SIZE = 15  # torchvision's GoogLeNet_Weights meta: min_size (15, 15)


class Inception(Block):
    """The Inception (v1) module: 1x1 | 1x1->3x3 | 1x1->"5x5" | maxpool 3/1->1x1.

    Branch and layer names are torchvision's: `branch2.0` is branch 2's first conv.
    """

    def __init__(self, name, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__(name)
        setattr(self, "branch1", self._conv("branch1", in_channels, ch1x1, 1))
        setattr(self, "branch2.0", self._conv("branch2.0", in_channels, ch3x3red, 1))
        setattr(self, "branch2.1", self._conv("branch2.1", ch3x3red, ch3x3, 3, padding=1))
        setattr(self, "branch3.0", self._conv("branch3.0", in_channels, ch5x5red, 1))
        # Departure from the paper, kept for weight compatibility: the paper's 5x5 conv is a
        # 3x3 here, as in torchvision, whose published weights have 3x3 filters in this
        # place ("a known bug", pytorch/vision#906).
        setattr(self, "branch3.1", self._conv("branch3.1", ch5x5red, ch5x5, 3, padding=1))
        setattr(self, "branch4.1", self._conv("branch4.1", in_channels, pool_proj, 1))
        layer = vars(self)
        self.branches = [
            [layer["branch1"]],                                                  # HxWxch1x1
            [layer["branch2.0"], layer["branch2.1"]],                            # ch3x3red -> ch3x3
            [layer["branch3.0"], layer["branch3.1"]],                            # ch5x5red -> ch5x5
            [max_pool(3, stride=1, padding=1, ceil_mode=True, name=f"{name}.branch4.0"),
             layer["branch4.1"]],                                                # HxWxC -> pool_proj
        ]


class InceptionAux(Block):
    """An auxiliary classifier (a training-time regulariser in the paper, section 5):
    adaptive avgpool to 4x4 -> 1x1 conv -> fc1 + ReLU -> fc2. Dropout is the identity."""

    def __init__(self, name, in_channels, num_classes):
        super().__init__(name)
        self.conv = self._conv("conv", in_channels, 128, 1)
        # torch flattens the 4x4x128 map in (C, H, W) order; fc1's rows are put in NHWC's order at load.
        self.fc1 = Linear(f"{name}.fc1", 2048, 1024, relu=True, input_chw=(128, 4, 4))
        self.fc2 = Linear(f"{name}.fc2", 1024, num_classes)
        self.pool = Pool(None, "adaptive_avg_pool2d", output_size=(4, 4))
        self.chain = [
            self.pool,                                                       # 4x4xC
            self.conv,                                                       # 4x4x128
            self.fc1,                                                        # 1024
            self.fc2,                                                        # 1000
        ]


class GoogLeNet(Network):
    """GoogLeNet for inference. Build it with `pyincept.googlenet(...)`."""

    title = "GoogLeNet"
    min_size = (MIN_SIZE, MIN_SIZE)

    def __init__(self, num_classes=NUM_CLASSES, fuse=True, algorithm="winograd", aux_logits=True):
        # One stage per line, as in the paper's table 1; shapes for a 224x224x3 input.
        stages = [
            BasicConv2d("conv1", 3, 64, 7, stride=2, padding=3),                       # 112x112x64
            Pool("maxpool1", "max_pool2d", kernel_size=3, stride=2, ceil_mode=True),   # 56x56x64
            BasicConv2d("conv2", 64, 64, 1),                                           # 56x56x64
            BasicConv2d("conv3", 64, 192, 3, padding=1),                               # 56x56x192
            Pool("maxpool2", "max_pool2d", kernel_size=3, stride=2, ceil_mode=True),   # 28x28x192
            Inception("inception3a", 192, 64, 96, 128, 16, 32, 32),                    # 28x28x256
            Inception("inception3b", 256, 128, 128, 192, 32, 96, 64),                  # 28x28x480
            Pool("maxpool3", "max_pool2d", kernel_size=3, stride=2, ceil_mode=True),   # 14x14x480
            Inception("inception4a", 480, 192, 96, 208, 16, 48, 64),                   # 14x14x512
            Inception("inception4b", 512, 160, 112, 224, 24, 64, 64),                  # 14x14x512
            Inception("inception4c", 512, 128, 128, 256, 24, 64, 64),                  # 14x14x512
            Inception("inception4d", 512, 112, 144, 288, 32, 64, 64),                  # 14x14x528
            Inception("inception4e", 528, 256, 160, 320, 32, 128, 128),                # 14x14x832
            Pool("maxpool4", "max_pool2d", kernel_size=2, stride=2, ceil_mode=True),   # 7x7x832
            Inception("inception5a", 832, 256, 160, 320, 32, 128, 128),                # 7x7x832
            Inception("inception5b", 832, 384, 192, 384, 48, 128, 128),                # 7x7x1024
            Pool("avgpool", "global_avg_pool2d"),                                      # 1x1x1024
            Linear("fc", 1024, num_classes),                                           # 1000
        ]
        # The auxiliary heads read inception4a's and inception4d's outputs; run only when asked for.
        aux = {"aux1": (InceptionAux("aux1", 512, num_classes), "inception4a"),
               "aux2": (InceptionAux("aux2", 528, num_classes), "inception4d")} if aux_logits else {}
        self._finish(stages, aux, num_classes, fuse, algorithm)


# torchvision's GoogLeNet_Weights.IMAGENET1K_V1 (ported from Google's TensorFlow release):
# ImageClassification(crop_size=224) with its default resize 256, and transform_input=True,
# which the published weights need (torchvision sets it whenever they are loaded).
SPEC = ModelSpec(
    name="googlenet",
    title="GoogLeNet",
    paper="Szegedy et al. 2014, Going deeper with convolutions",
    network=GoogLeNet,
    input_size=(224, 224),
    min_size=(MIN_SIZE, MIN_SIZE),
    num_classes=NUM_CLASSES,
    weights=(
        WeightSet(
            name="IMAGENET1K_V1",
            url="https://download.pytorch.org/models/googlenet-1378be20.pth",
            sha256_prefix="1378be20",
            preprocessing={
                "resize_size": 256,
                "crop_size": 224,
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
                "transform_input": True,
            },
        ),
    ),
)
GoogLeNet.spec = SPEC
