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
from collections.abc import Mapping
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
    reshaped = [(k, shape_of(params, k), tuple(s)) for k, s in expected_shapes.items()
                if k in params and shape_of(params, k) != tuple(s)]
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


def load_weights(path, keys=None):
    """Read a pyincept weight file -> (params, meta): every array, or those of `keys` only.
    Never unpickles anything."""
    with WeightFile(path) as weights:
        return {key: weights[key] for key in (weights if keys is None else keys)}, weights.meta


class WeightFile(Mapping):
    """A pyincept weight file, open: its keys, shapes and `meta` at once, each array read
    from the file only when asked for, and not kept. A model built from it takes its
    arrays stage by stage, so the file's copy of the weights never lives whole beside the
    kernels' forms (the loading peak of resident memory). Never unpickles anything; a read
    that fails is a one-line WeightsError, as when opening."""

    def __init__(self, path):
        self.path = Path(path)
        self._npz = self._guard(lambda: np.load(self.path, allow_pickle=False))
        if not isinstance(self._npz, np.lib.npyio.NpzFile):            # a bare .npy array
            self._npz = None
            raise WeightsError(f"{self.path}: not a pyincept weight file (one .npy array, not an .npz)")
        try:
            names = list(self._npz.files)
            if _FORMAT_KEY not in names:
                raise WeightsError(f"{self.path}: not a pyincept weight file (no {_FORMAT_KEY}); "
                                   "convert checkpoints with `pyincept convert`")
            version = int(self._guard(lambda: self._npz[_FORMAT_KEY]))
            if version != FORMAT_VERSION:
                raise WeightsError(f"{self.path}: weight file format {version}, "
                                   f"this pyincept reads format {FORMAT_VERSION}")
            self.meta = json.loads(str(self._guard(lambda: self._npz[_META_KEY]))) if _META_KEY in names else {}
            self._keys = {k: None for k in names if k not in (_FORMAT_KEY, _META_KEY)}   # ordered, as the file lists them
        except BaseException:
            self.close()
            raise

    def _guard(self, read):
        """read(), with what goes wrong said in one line naming the file."""
        path = self.path
        try:
            return read()
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

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._guard(lambda: self._npz[key])

    def __contains__(self, key):
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def shape(self, key):
        """An array's shape, from its .npy header alone."""
        def header():
            with self._npz.zip.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                return read(f)[0]
        if key not in self._keys:
            raise KeyError(key)
        return tuple(self._guard(header))

    def pop(self, key, default=None):
        """Forget `key` (a model that took the array): nothing of it is held here anyway."""
        return default if self._keys.pop(key, _MISSING) is _MISSING else None

    def clear(self):
        self._keys.clear()

    def close(self):
        if self._npz is not None:
            self._npz.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_MISSING = object()


def shape_of(params, key):
    """The shape of params[key], without reading it where params is a WeightFile."""
    return params.shape(key) if isinstance(params, WeightFile) else tuple(params[key].shape)


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
    "WeightFile",
    "check_parameters",
    "load_weights",
    "save_weights",
    "sha256_file",
    "torch_to_pyincept",
]
