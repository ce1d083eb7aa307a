"""Folders of images (or statistics files) -> FID, KID and Inception Score, as the tools compute them.

    stats = pyincept.metrics.compute_statistics("real/", model, protocol="torch-fidelity")
    stats.save("real.npz")                                    # pytorch-fid reads it too
    scores = pyincept.calculate_metrics("fake/", "real.npz", fid=True, weights="fid.npz")
    scores["frechet_inception_distance"]

The flow, for each input: find the images (as `classify` finds them), decode and resize
each by the protocol, run the FID Inception in batches, keep the features the metrics need
(FID: streaming float64 statistics; KID and IS: the features themselves), then score.
Unreadable images are skipped and listed in `failed`; they never stop a run.
"""

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import PyinceptError, stop_if_interrupted
from ..predict import find_images
from ..preprocess import ImageError
from . import features as feats
from .fid import frechet_distance, warn_if_few
from .isc import SPLITS, inception_score
from .kid import SUBSET_SIZE, SUBSETS, kernel_inception_distance
from .protocols import get_protocol
from .stats import FeatureStats

DEFAULT_PROTOCOL = "pytorch-fid"
BATCH_SIZE = 50


@dataclass
class InputFeatures:
    """What one input gave: its statistics (FID), its kept features (KID, IS) and its failures."""

    source: str
    count: int | None = None                            # images used (None: a file of mu and sigma)
    stats: FeatureStats | None = None
    features: dict = field(default_factory=dict)        # {feature name: (N, D) float32}
    failed: list = field(default_factory=list)          # [(path, one-line reason)]


def is_statistics_file(source):
    return isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz") and os.path.isfile(source)


def input_features(source, model, protocol=DEFAULT_PROTOCOL, dims=2048, keep=(), batch_size=BATCH_SIZE,
                   progress=False, stats=True, on_error=None, cluster=None, paths=None):
    """Run one input through the protocol and the network.

    source: a folder (searched as `classify` searches), an image path, a list of paths, or a
    statistics `.npz`. dims: the FID feature (64, 192, 768 or 2048). keep: feature names to
    keep whole (KID: "2048", IS: "logits_unbiased"). on_error(path, reason) is called for
    each unreadable image as it is skipped. cluster: a `Cluster` to run the images' shards
    on Ray (model is then unused: each worker loads `cluster.source`). paths: the images
    already found in `source`, when the caller has searched it.
    """
    if is_statistics_file(source):
        if keep:
            raise PyinceptError(f"{source}: a statistics file gives FID only; KID and IS need the images")
        loaded = FeatureStats.load(source)
        return InputFeatures(str(source), loaded.count, loaded)
    paths = _images_in(source) if paths is None else paths
    if not paths:
        raise PyinceptError(f"no images found in {source}")
    from tqdm import tqdm

    with tqdm(total=len(paths), unit="img", disable=not progress, leave=False, desc=os.path.basename(str(source))) as bar:
        if cluster is None:
            result = extract_images(paths, model, protocol, dims, keep, batch_size, stats, on_error, bar.update)
        else:
            result = cluster.extract(paths, protocol, dims, keep, batch_size, stats, on_error, bar.update)
    result.source = str(source)
    return result


def extract_images(paths, model, protocol=DEFAULT_PROTOCOL, dims=2048, keep=(), batch_size=BATCH_SIZE, stats=True,
                   on_error=None, progress=None):
    """`input_features` for a list of image paths, in this process: an InputFeatures."""
    feats.check_model(model)
    recipe = get_protocol(protocol)
    fid_name = _fid_feature(dims)
    names = sorted({fid_name, *keep} if stats else set(keep))
    result = InputFeatures("", 0)
    result.stats = FeatureStats(dims, {"feature": fid_name, "protocol": recipe.name, "model": _identity(model)}) if stats else None
    kept = {name: [] for name in keep}

    def load(chunk):                                     # decode and resize: (n, 299, 299, 3) and failures
        pixels, failed = [], []
        for path in chunk:
            try:
                pixels.append(recipe(path))
            except ImageError as e:
                failed.append((path, str(e)))
        return pixels, failed

    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(1) as loader:
        # One thread decodes and resizes the next batch while the network runs this one.
        pending = loader.submit(load, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            stop_if_interrupted()
            pixels, failed = pending.result()
            if k + 1 < len(chunks):
                pending = loader.submit(load, chunks[k + 1])
            for path, reason in failed:
                result.failed.append((path, reason))
                if on_error:
                    on_error(path, reason)
            if pixels:
                out = feats.extract(model, np.stack(pixels), names)
                if result.stats is not None:
                    result.stats.add(out[fid_name])
                for name in keep:
                    kept[name].append(out[name])
                result.count += len(pixels)
            if progress:
                progress(len(chunk))
    result.features = {name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for name, parts in kept.items()}
    return result


@dataclass
class Cluster:
    """Where `calculate_metrics(ray=...)` runs: a Ray address ("local" or one for ray.init),
    the model every worker loads, actors and threads per actor, images per shard."""

    address: str
    source: object                       # distributed.ModelSource
    workers: int | None = None
    threads: int | None = None
    shard_size: int = 1000

    def extract(self, paths, protocol, dims, keep, batch_size, stats, on_error, progress):
        """`extract_images` over shards on Ray, merged in shard order (float64 sums add)."""
        from ..distributed import run_shards
        from ..distributed.tasks import StatisticsTask, failures

        task = StatisticsTask(self.source, protocol, dims, keep, batch_size, stats)
        fid_name = _fid_feature(dims)
        result = InputFeatures("", 0)
        result.stats = FeatureStats(dims, {"feature": fid_name, "protocol": get_protocol(protocol).name}) if stats else None
        kept = {name: [] for name in keep}
        for _, part in run_shards(task, paths, self.shard_size, self.address, self.workers, self.threads,
                                  progress=progress):
            for path, reason in failures(part):
                result.failed.append((path, reason))
                if on_error:
                    on_error(path, reason)
            count = int(part["count"])
            result.count += count
            if result.stats is not None:
                result.stats.merge(FeatureStats.from_sums(count, part["sum"], part["outer_sum"]))
            for name in keep:
                kept[name].append(part[f"keep_{name}"])
        result.features = {name: np.concatenate([p for p in parts if p.size]) if any(p.size for p in parts)
                           else np.zeros((0, 0), np.float32) for name, parts in kept.items()}
        return result


def compute_statistics(source, model, protocol=DEFAULT_PROTOCOL, dims=2048, batch_size=BATCH_SIZE, progress=False):
    """The FID statistics (`FeatureStats`) of a folder or list of images. Unreadable images
    are skipped; `input_features` returns their paths too."""
    return input_features(source, model, protocol, dims, batch_size=batch_size, progress=progress).stats


def calculate_metrics(input1, input2=None, fid=False, kid=False, isc=False, model=None, weights=None,
                      protocol=DEFAULT_PROTOCOL, dims=2048, batch_size=BATCH_SIZE, kid_subsets=SUBSETS,
                      kid_subset_size=SUBSET_SIZE, isc_splits=SPLITS, save_stats=(), progress=False,
                      on_error=None, device="cpu", ray=None, workers=None, threads_per_worker=None, shard_size=1000):
    """FID, KID and IS of input1 (against input2), by torch-fidelity's keys, as
    `torch_fidelity.calculate_metrics` returns them, plus each input's image and failure counts:

        {"frechet_inception_distance": ..., "kernel_inception_distance_mean": ...,
         "kernel_inception_distance_std": ..., "inception_score_mean": ..., "inception_score_std": ...,
         "input1": {"source": "fake/", "images": 50000, "failed": [(path, reason), ...]}, "input2": {...}}

    input1, input2: folders, lists of image paths, or statistics `.npz` (FID only).
    model: a loaded network; else `weights` (a pyincept .npz) or the fetched FID Inception.
    IS is input1's. KID and FID need input2. save_stats: paths to save each image input's
    FID statistics to, in order. The per-input `failed` lists come back under
    "input1"/"input2" as [(path, reason)] too.

    ray: run the images on a Ray cluster ("local", or an address for ray.init), in shards of
    `shard_size`, with `workers` actors of `threads_per_worker` threads; each worker loads
    `weights` (a path every worker can read). Statistics merge in float64: they agree with
    one process's within 1e-12, and KID's and IS's features are the same bits.
    """
    if not (fid or kid or isc or save_stats):
        fid = input2 is not None
        if not fid:
            raise PyinceptError("nothing to compute: ask for --fid, --kid or --isc (FID and KID need two inputs), "
                                "or --save-stats")
    if (fid or kid) and input2 is None:
        raise PyinceptError(f"{'FID' if fid else 'KID'} compares two inputs: give INPUT2 (a folder or a statistics file)")
    if isinstance(save_stats, (str, os.PathLike)):
        save_stats = [save_stats]
    inputs = [s for s in (input1, input2) if s is not None]
    image_inputs = [s for s in inputs if not is_statistics_file(s)]
    if len(save_stats) > len(image_inputs):
        raise PyinceptError(f"{len(save_stats)} --save-stats files for {len(image_inputs)} image input(s)")
    found = {i: _images_in(s) for i, s in enumerate(inputs) if not is_statistics_file(s)}    # each folder walked once
    _check_counts(inputs, found, kid, isc, kid_subset_size, isc_splits)
    cluster = None
    if image_inputs and ray is not None:
        from ..distributed import ModelSource, check_address

        if weights is None and model is not None:
            raise PyinceptError("with ray=..., pass weights= (a file every worker can read), not a loaded model")
        if weights == "random":                               # the seeded init, for study
            source = ModelSource("random", "inception_v3_fid", device)
        else:
            source = ModelSource(fid_weights_path(weights), device=device)
            _check_weights_file(source.weights)              # here, before any worker starts
        cluster = Cluster(check_address(ray), source, workers, threads_per_worker, shard_size)
    elif image_inputs and model is None:
        model = load_fid_model(weights, device)
    fid_name = _fid_feature(dims)
    results = []
    for i, source in enumerate(inputs):
        keep = []
        if kid:
            keep.append(fid_name)
        if isc and i == 0:
            keep.append("logits_unbiased")
        need_stats = fid or bool(save_stats)
        results.append(input_features(source, model, protocol, dims, tuple(keep), batch_size, progress,
                                      stats=need_stats, on_error=on_error, cluster=cluster, paths=found.get(i)))
    for path, result in zip(save_stats, [r for r, s in zip(results, inputs) if not is_statistics_file(s)]):
        result.stats.save(path)
    scores = {}
    if fid:
        s1, s2 = results[0].stats, results[1].stats
        if s1.dims != s2.dims:
            raise PyinceptError(f"{results[0].source} has {s1.dims}-d statistics and {results[1].source} {s2.dims}-d: "
                                "compute both with the same --dims")
        for r in results[:2]:
            warn_if_few(r.count, r.stats.dims, r.source)
        for key in ("protocol", "model"):
            made = [r.stats.meta.get(key) for r in results[:2]]
            if None not in made and made[0] != made[1]:
                warnings.warn(f"the two inputs' statistics come from different {key}s ({made[0]} and {made[1]}): "
                              "their FID mixes the two", stacklevel=2)
        scores["frechet_inception_distance"] = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    if kid:
        scores.update(kernel_inception_distance(results[0].features[fid_name], results[1].features[fid_name],
                                                kid_subsets, kid_subset_size))
    if isc:
        scores.update(inception_score(results[0].features["logits_unbiased"], isc_splits))
    for i, r in enumerate(results):
        scores[f"input{i + 1}"] = {"source": r.source, "images": r.count, "failed": r.failed}
    return scores


def _images_in(source):
    """The image paths of an input: a folder or image path (searched as classify searches), or a list."""
    return find_images([source] if isinstance(source, (str, os.PathLike)) else list(source))


def _check_counts(inputs, found, kid, isc, kid_subset_size, isc_splits):
    """Fail before the network runs when there are too few images for KID's subsets or IS's
    splits (unreadable images can still make too few; the metric then says so)."""
    wanted = [(i, source) for i, source in enumerate(inputs) if kid or (isc and i == 0)]
    for _, source in wanted:
        if is_statistics_file(source):
            raise PyinceptError(f"{source}: a statistics file gives FID only; KID and IS need the images")
    for i, source in wanted:
        n = len(found[i])
        if kid and n < kid_subset_size:
            raise PyinceptError(f"KID subsets of {kid_subset_size} images need at least that many in each input "
                                f"({source}: {n}); pass a smaller --kid-subset-size")
        if isc and i == 0 and n < isc_splits:
            raise PyinceptError(f"IS in {isc_splits} splits needs at least that many images ({source}: {n}); "
                                "pass a smaller --isc-splits")


def _fid_feature(dims):
    if int(dims) not in feats.DIMS:
        raise PyinceptError(f"--dims must be one of {', '.join(map(str, feats.DIMS))}, got {dims}")
    return str(int(dims))


def _identity(model):
    meta = model.meta or {}
    return meta.get("source_sha256") or meta.get("source") or (model.spec.name if model.spec else "")


def load_fid_model(weights=None, device="cpu", algorithm="winograd"):
    """The FID Inception from `weights` (a pyincept .npz), else $PYINCEPT_WEIGHTS, else the fetched one."""
    from ..models import registry

    model = registry.load_model(fid_weights_path(weights), device=device, algorithm=algorithm)
    feats.check_model(model)
    return model


def _check_weights_file(path):
    from ..io.npz import load_weights
    from ..models.registry import get_spec, held_model

    name = held_model(*load_weights(path), path)
    feats.check_model_name(name, get_spec(name).title)


def fid_weights_path(weights=None):
    """`weights`, else $PYINCEPT_WEIGHTS, else the fetched FID Inception's file, as an absolute
    path (a one-line error if none)."""
    from ..io.fetch import weights_path

    return os.path.abspath(weights_path(weights, "inception_v3_fid")[1])
