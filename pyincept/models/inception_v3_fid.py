"""The FID Inception: TensorFlow's 2015-12-05 Inception v3 graph, the network every FID, KID
and Inception Score tool scores images with (pytorch-fid, torch-fidelity, clean-fid), and the
graph the seed's post opened for its "peek inside" (`mixed/tower_2/conv` is Mixed_5b.branch_pool).

It is torchvision's Inception v3 (inception_v3.py) with three patches, as pytorch-fid makes
them (`pytorch_fid/inception.py`: FIDInceptionA, C, E_1, E_2), each labelled where it happens:
- 1008 classes (the 2015 graph's label set: 1000 ImageNet classes and 8 unused), no aux head;
- the average pools of Mixed_5b-d, 6b-e and 7b do not count their zero padding;
- Mixed_7c's pool branch is a 3x3 max pool.

Input is NHWC float32 `(N, 299, 299, 3)` in [-1, 1]; how each tool gets images there (its
resize, its scaling) is its protocol, outside the model. Output is logits `(N, 1008)`;
`avgpool` is the 2048-d feature every FID uses.
"""

from ..layers import avg_pool, max_pool
from .inception_v3 import MIN_SIZE, Inception3, InceptionA, InceptionC, InceptionE
from .spec import ModelSpec, WeightSet

NUM_CLASSES = 1008


def _avg_pool_without_padding(kernel_size, stride=None, padding=0):
    # Patch: TensorFlow's average pool does not count the zero padding (count_include_pad=False).
    return avg_pool(kernel_size, stride, padding, count_include_pad=False)


def _max_pool(kernel_size, stride=None, padding=0):
    # Patch: the 2015 graph's last module pools by max, not average (pytorch-fid: "likely an
    # error in this specific Inception implementation"), kept because the weights expect it.
    return max_pool(kernel_size, stride, padding)


class FIDInceptionA(InceptionA):
    pool = staticmethod(_avg_pool_without_padding)


class FIDInceptionC(InceptionC):
    pool = staticmethod(_avg_pool_without_padding)


class FIDInceptionE_1(InceptionE):
    pool = staticmethod(_avg_pool_without_padding)


class FIDInceptionE_2(InceptionE):
    pool = staticmethod(_max_pool)


class Inception3FID(Inception3):
    """The FID Inception for inference. Build it with `pyincept.create_model("inception_v3_fid", ...)`."""

    title = "the FID Inception"
    blocks = {"A": FIDInceptionA, "C": FIDInceptionC, "E_1": FIDInceptionE_1, "E_2": FIDInceptionE_2}

    def __init__(self, num_classes=NUM_CLASSES, fuse=True, algorithm="winograd", aux_logits=False):
        super().__init__(num_classes, fuse, algorithm, aux_logits=aux_logits)


# pytorch-fid's port of the 2015 graph (a torchvision-style state dict), a release asset of
# mseitzer/pytorch-fid. Its recipe here (for classify, activations and retrain) is
# pytorch-fid's scaling, 2x - 1 of [0, 1] pixels, after a 299x299 resize and centre crop;
# each tool's exact decode and resize is its metrics protocol (metrics/protocols.py).
_RECIPE = {"resize_size": 299, "crop_size": 299, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "transform_input": False}

SPEC = ModelSpec(
    name="inception_v3_fid",
    title="the FID Inception",
    paper="Szegedy et al. 2015 (TensorFlow's 2015-12-05 graph); Heusel et al. 2017, GANs Trained by a Two Time-Scale Update Rule (FID)",
    network=Inception3FID,
    input_size=(299, 299),
    min_size=(MIN_SIZE, MIN_SIZE),
    num_classes=NUM_CLASSES,
    weights=(
        WeightSet(
            name="PT_INCEPTION_2015_12_05",
            url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            sha256_prefix="6726825d",
            preprocessing=_RECIPE,
            labels=None,
        ),
        # torch-fidelity's own conversion of the same graph: the same keys and shapes, and the
        # same hash prefix in its name. `pyincept convert` reads either.
        WeightSet(
            name="TORCH_FIDELITY_2015_12_05",
            url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
            sha256_prefix="6726825d",
            preprocessing=_RECIPE,
            labels=None,
        ),
    ),
)
Inception3FID.spec = SPEC
