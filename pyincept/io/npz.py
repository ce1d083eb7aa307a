"""pyincept's own weight file: the `.npz` format, and torch's layout turned into pyincept's.

The file is a NumPy `.npz` (a zip of `.npy` arrays) read with `allow_pickle=False`:
loading it can never run code. It holds

- one array per parameter, under torchvision's state-dict key, in pyincept's layout:
  conv weights HWIO `(R, S, C, K)` (torch stores OIHW `(K, C, R, S)`), linear
  weights `(in, out)` (torch stores `(out, in)`), batch-norm vectors unchanged;
- `__format_version__`: an integer, bumped whenever the layout changes;
- `__meta__`: a JSON string: the model's registered name (`model`), the source file and
  its SHA-256, the preprocessing recipe the weights expect.

Batch norm is kept unfolded in the file, so it stays a faithful copy of the
checkpoint; the network folds it into the convolutions when it loads
(`layers.fold_batchnorm`).

Checkpoints are read by `checkpoint.read_checkpoint`, which never imports torch and never
executes pickled code; `convert.py` turns one into this file.
"""

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, WeightsError
from .files import write_atomically

FORMAT_VERSION = 1
_FORMAT_KEY = "__format_version__"
_META_KEY = "__meta__"
# Keys a torch state dict may carry that hold no weights.
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def torch_to_pyincept(state):
    """Re-lay a torch state dict for NHWC kernels: OIHW -> HWIO, (out, in) -> (in, out)."""
    params = {}
    for key, value in state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        value = np.asarray(value)
        if value.dtype.kind != "f":
            raise WeightsError(f"key {key!r} holds {value.dtype} values, expected floating point")
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)                       # (K,C,R,S) -> (R,S,C,K)
        elif value.ndim == 2:
            value = value.T                                          # (O,I) -> (I,O)
        params[key] = np.ascontiguousarray(value, dtype=np.float32)
    return params


def parameter_mismatch(params, expected_shapes):
    """(missing keys, unexpected keys, [(key, its shape, the expected shape)]) of `params`
    against a parameter table."""
    missing = [k for k in expected_shapes if k not in params]
    unexpected = [k for k in params if k not in expected_shapes]
    reshaped = [(k, tuple(params[k].shape), tuple(s)) for k, s in expected_shapes.items()
                if k in params and tuple(params[k].shape) != tuple(s)]
    return missing, unexpected, reshaped


def check_parameters(params, expected_shapes, source, title=None):
    """Same key set, every shape equal; else one line naming the key(s) and both shapes."""
    missing, unexpected, reshaped = parameter_mismatch(params, expected_shapes)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({first_keys(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({first_keys(unexpected)})")
        what = f"{_article(title)} {title} state dict" if title else "the model's state dict"
        raise WeightsError(f"{source}: not {what}: " + "; ".join(parts))
    if reshaped:
        key, got, want = reshaped[0]
        raise WeightsError(f"{source}: key {key!r} has shape {got}, expected {want}")


def _article(title):
    return "an" if title[0].lower() in "aeiou" else "a"


def first_keys(keys, n=3, quote=True):
    """The first n of `keys` for a one-line message, then "..." if there are more."""
    shown = ", ".join(repr(k) if quote else k for k in keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def save_weights(path, params, meta=None):
    """Write a pyincept weight file atomically (a half-written file never has the final name)."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
    arrays[_FORMAT_KEY] = np.array(FORMAT_VERSION, dtype=np.int64)
    arrays[_META_KEY] = np.array(json.dumps(meta or {}, sort_keys=True))
    write_atomically(path, lambda f: np.savez(f, **arrays))


def load_weights(path):
    """Read a pyincept weight file -> (params, meta). Never unpickles anything."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weight file") from None
    except PermissionError:
        raise WeightsError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a folder, not a weight file") from None
    except ValueError as e:
        # np.load says "Object arrays cannot be loaded when allow_pickle=False" for pickles.
        raise WeightsError(f"{path}: not a pyincept weight file ({_one_line(e)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: unreadable or corrupt weight file ({_one_line(e)})") from None
    if _FORMAT_KEY not in arrays:
        raise WeightsError(f"{path}: not a pyincept weight file (no {_FORMAT_KEY}); convert checkpoints with `pyincept convert`")
    version = int(arrays.pop(_FORMAT_KEY))
    if version != FORMAT_VERSION:
        raise WeightsError(f"{path}: weight file format {version}, this pyincept reads format {FORMAT_VERSION}")
    meta = json.loads(str(arrays.pop(_META_KEY))) if _META_KEY in arrays else {}
    return arrays, meta


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "check_parameters",
    "load_weights",
    "save_weights",
    "sha256_file",
    "torch_to_pyincept",
]
