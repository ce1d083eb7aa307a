"""What travels with a model's weights: the published file, its hash, the preprocessing it was
trained with, its labels and sizes (as torchvision's `Weights` enums and timm's `default_cfgs`).

Each model file declares one `ModelSpec` beside its network; `registry.py` collects them.
"""

import posixpath
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WeightSet:
    """One published checkpoint of a model.

    name          torchvision's enum member, e.g. "IMAGENET1K_V1"
    url           where the checkpoint is published; its basename is the file's name
    sha256_prefix the hex digits in that name: all of the hash that was ever published
    preprocessing the recipe the weights expect (`pyincept.preprocess` settings)
    labels        which class names index the logits ("imagenet": pyincept.imagenet_labels)
    """

    name: str
    url: str
    sha256_prefix: str
    preprocessing: dict
    labels: str = "imagenet"

    @property
    def filename(self):
        return posixpath.basename(self.url)

    @property
    def converted_filename(self):
        return self.filename.rsplit(".", 1)[0] + ".npz"


@dataclass(frozen=True)
class ModelSpec:
    """A registered network: how to build it and what it expects.

    network     the Network subclass (called with num_classes=, fuse=, algorithm=)
    input_size  (H, W) the published weights were trained at; min_size the smallest input
    paper       the paper it follows, as people cite it
    weights     its published weight sets, the default first
    """

    name: str
    title: str
    paper: str
    network: type
    input_size: tuple
    min_size: tuple
    num_classes: int = 1000
    weights: tuple = field(default_factory=tuple)

    @property
    def default_weights(self):
        return self.weights[0] if self.weights else None

    def weight_set(self, name=None):
        """The weight set called `name` (default: the first)."""
        for ws in self.weights:
            if name in (None, ws.name):
                return ws
        raise KeyError(name)
