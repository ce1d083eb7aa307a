"""A torch checkpoint (.pth) of any registered model -> pyincept's weight file (.npz).

The architecture is recognised from the checkpoint's keys and shapes (`detect_model`), or
forced with `model=`; the file then records the model's name and the preprocessing recipe
of its published weights, so `pyincept.load_model` knows what to build and `classify` how
to prepare images. What it is not: a loader for whole pickled modules or TorchScript
archives (`checkpoint.py` refuses those without running them).
"""

from pathlib import Path

from ..errors import WeightsError
from ..models.registry import detect_model, get_spec
from .checkpoint import read_checkpoint
from .npz import check_parameters, save_weights, sha256_file, torch_to_pyincept


def convert_checkpoint(src, dst, model=None):
    """Convert `src` into `dst`; returns the metadata written. model: a registered name, or
    None to recognise it from the keys (a one-line error names the nearest model otherwise)."""
    src, dst = Path(src), Path(dst)
    params = torch_to_pyincept(read_checkpoint(src))
    if model is None:
        name = detect_model(params, src)                      # an exact fit, or a one-line error
        spec = get_spec(name)
    else:
        spec = get_spec(model)
        name = spec.name
        check_parameters(params, spec.network().expected_shapes(params), src, spec.title)
    published = next((ws for ws in spec.weights if ws.filename == src.name), spec.default_weights)
    meta = {
        "model": name,
        "weight_set": published.name if published.filename == src.name else None,
        "source": src.name,
        "source_sha256": sha256_file(src),
        "converted_by": "pyincept",
        "layout": "NHWC activations; conv weights HWIO; linear weights (in, out)",
        "preprocessing": published.preprocessing,
    }
    try:
        save_weights(dst, params, meta)
    except OSError as e:
        raise WeightsError(f"{dst}: cannot write ({e.strerror or e})") from None
    return meta
