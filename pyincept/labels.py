"""The 1000 ImageNet class names, in the order of Inception v3's logits.

Shipped inside the package (`imagenet_classes.txt`, one name per line, the list
torchvision publishes with its ImageNet weights), so nothing is downloaded.
"""

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_labels():
    """Tuple of 1000 class names; index i names logit i."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    labels = tuple(line for line in text.splitlines() if line)
    assert len(labels) == 1000, f"imagenet_classes.txt has {len(labels)} names, expected 1000"
    return labels
