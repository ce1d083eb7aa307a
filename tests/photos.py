"""The shipped test photographs, and a plain torchvision-free preparation of them.

`photo_batch` turns photographs into the NHWC float32 tensor an ImageNet network
sees: shorter side resized, centre crop, [0,1], ImageNet mean/std. It is a test
fixture, deliberately simple; the library's own preprocessing is tested elsewhere.
"""

from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def photo_batch(size=(299, 299), paths=PHOTOS):
    """(N, H, W, 3) float32: each photo resized to cover `size`, centre-cropped, normalised."""
    h, w = size
    out = []
    for path in paths:
        im = Image.open(path).convert("RGB")
        scale = max(h / im.height, w / im.width)
        im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
        top, left = (im.height - h) // 2, (im.width - w) // 2
        im = im.crop((left, top, left + w, top + h))
        out.append((np.asarray(im, np.float32) / 255.0 - MEAN) / STD)
    return np.stack(out).astype(np.float32)
