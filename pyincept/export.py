"""Export each image's features (a layer's output, by default the model's pooled features) with
its path, as shards in a folder, here or on a Ray cluster; an interrupted export resumes.

    DIR/manifest.json           what the export is of: the inputs (count and hash), layer, model, shard size
    DIR/shard-00000.npz         paths (n,), features (n, D) float32, failed_paths, failed_reasons
    DIR/shard-00000.parquet     or, with format="parquet" (needs pyarrow): columns path,
                                features (D floats, null for a failed image), error (null when read)

Shard i holds inputs [i S, (i + 1) S) of the sorted input list, so it is the same file
whoever computes it. Each shard is written to a temporary name and renamed: after an
interrupt every shard file is complete or absent, and a rerun with the same inputs and
settings skips the shards that are there. `load_features(DIR)` reads an export back.
"""

import glob
import hashlib
import json
import os

import numpy as np

from .errors import PyinceptError
from .io.files import PART, write_atomically

MANIFEST = "manifest.json"
FORMATS = ("npz", "parquet")
VERSION = 1


def export_features(paths, source, out, layer=None, shard_size=1000, format="npz", batch_size=8, ray=None,
                    workers=None, threads=None, progress=None, on_error=None):
    """Write the features of `paths` (a list, in order) under folder `out`; returns a summary
    {"images", "failed", "shards", "skipped", "folder"}. source: a distributed.ModelSource."""
    from .distributed import run_shards
    from .distributed.tasks import FeaturesTask, failures

    if format not in FORMATS:
        raise PyinceptError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    if format == "parquet":
        _pyarrow()
    paths = [str(p) for p in paths]
    manifest = {"version": VERSION, "inputs": len(paths), "inputs_sha256": _digest(paths), "shard_size": shard_size,
                "layer": layer, "weights": source.weights, "model": source.model, "format": format}
    _prepare(out, manifest)
    count = -(-len(paths) // shard_size)
    done = [i for i in range(count) if os.path.exists(_shard_path(out, i, format))]
    summary = {"folder": str(out), "shards": count, "skipped": len(done), "images": 0, "failed": []}
    task = FeaturesTask(source, layer, batch_size)
    for index, result in run_shards(task, paths, shard_size, ray, workers, threads, skip=done, progress=progress):
        for path, reason in failures(result):
            summary["failed"].append((path, reason))
            if on_error:
                on_error(path, reason)
        summary["images"] += len(result["paths"])
        _write_shard(out, index, result, format)
    return summary


def load_features(out):
    """(paths, features (N, D) float32, [(failed path, reason)]) of an export, in input order."""
    with open(os.path.join(out, MANIFEST)) as f:
        manifest = json.load(f)
    count = -(-manifest["inputs"] // manifest["shard_size"])
    paths, rows, failed = [], [], []
    for i in range(count):
        path = _shard_path(out, i, manifest["format"])
        if not os.path.exists(path):
            raise PyinceptError(f"{out}: shard {i} of {count} is missing (the export did not finish: run it again)")
        shard = _read_shard(path, manifest["format"])
        paths.extend(shard["paths"].tolist())
        if len(shard["paths"]):
            rows.append(shard["features"])
        failed.extend(zip(shard["failed_paths"].tolist(), shard["failed_reasons"].tolist()))
    features = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    return paths, features, failed


# --- the folder ----------------------------------------------------------------------------


def _prepare(out, manifest):
    """Create `out` with its manifest, or check that the one there describes this export."""
    os.makedirs(out, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(str(out)), "shard-*" + PART)):   # an interrupted write's leftovers
        os.unlink(stale)
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            there = json.load(f)
        differ = [k for k in manifest if there.get(k) != manifest[k]]
        if differ:
            raise PyinceptError(f"{out} holds an export with other {', '.join(differ)}: "
                                "choose a new --out folder (or delete that one)")
        return
    write_atomically(path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def _shard_path(out, index, format):
    return os.path.join(out, f"shard-{index:05d}.{format}")


def _write_shard(out, index, result, format):
    arrays = {k: result[k] for k in ("paths", "features", "failed_paths", "failed_reasons")}
    if format == "npz":
        write_atomically(_shard_path(out, index, format), lambda f: np.savez(f, **arrays))
        return
    pa, pq = _pyarrow()
    n, failed = len(arrays["paths"]), arrays["failed_paths"].tolist()
    dims = arrays["features"].shape[1] if n else 0
    features = [row for row in arrays["features"]] + [None] * len(failed)
    table = pa.table({
        "path": arrays["paths"].tolist() + failed,
        "features": pa.array(features, type=pa.list_(pa.float32(), dims) if dims else pa.list_(pa.float32())),
        "error": [None] * n + arrays["failed_reasons"].tolist(),
    })
    write_atomically(_shard_path(out, index, format), lambda f: pq.write_table(table, f))


def _read_shard(path, format):
    if format == "npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    _, pq = _pyarrow()
    table = pq.read_table(path).to_pydict()
    good = [i for i, e in enumerate(table["error"]) if e is None]
    bad = [i for i, e in enumerate(table["error"]) if e is not None]
    features = np.array([table["features"][i] for i in good], np.float32)
    return {"paths": np.array([table["path"][i] for i in good], dtype=str), "features": features,
            "failed_paths": np.array([table["path"][i] for i in bad], dtype=str),
            "failed_reasons": np.array([table["error"][i] for i in bad], dtype=str)}


def _digest(paths):
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PyinceptError("--format parquet needs pyarrow (pip install pyarrow, or the ray extra)") from None
    return pa, pq
