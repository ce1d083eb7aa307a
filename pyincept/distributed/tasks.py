"""What one shard of a job does, wherever it runs: a picklable task that loads its model on
first use (once per process or Ray actor) and answers a list of image paths with arrays.

    ClassifyTask    -> {"json": each Prediction's JSON line}            pyincept classify --ray
    FeaturesTask    -> {"paths", "features" (n, D), "failed_paths", "failed_reasons"}   pyincept features
    StatisticsTask  -> {"count", "sum", "outer_sum", "keep_<feature>" (n, D), "failed_..."}   pyincept metrics --ray

Answers are NumPy arrays (strings as unicode arrays), so they travel and are stored without
pickle. An unreadable image is a failed row, never a failed shard.
"""

import json

import numpy as np



class _Task:
    def __init__(self, source):
        self.source = source                  # a ModelSource
        self._network = None

    def model(self):
        if self._network is None:
            self._network = self.source.build()
        return self._network

    def __getstate__(self):                   # the model never travels: each worker loads its own
        state = dict(self.__dict__)
        state["_network"] = None
        return state


def _failures(failed):
    return {"failed_paths": np.array([p for p, _ in failed], dtype=str),
            "failed_reasons": np.array([r for _, r in failed], dtype=str)}


def failures(result):
    """[(path, reason)] of a task's answer."""
    return list(zip(result["failed_paths"].tolist(), result["failed_reasons"].tolist()))


class ClassifyTask(_Task):
    """`classify` on a shard: each input's Prediction as the JSON `pyincept classify --json` prints."""

    def __init__(self, source, top=5, batch_size=8):
        super().__init__(source)
        self.top, self.batch_size = top, batch_size

    def __call__(self, paths):
        from ..predict import classify

        predictions = classify(paths, self.model(), top=self.top, batch_size=self.batch_size)
        return {"json": np.array([json.dumps(p.to_json()) for p in predictions], dtype=str)}


class FeaturesTask(_Task):
    """A layer's output for each image (default the model's pooled features), flattened to
    (n, D) float32, after the model's own preprocessing recipe (as classify prepares images)."""

    def __init__(self, source, layer=None, batch_size=8):
        super().__init__(source)
        self.layer, self.batch_size = layer, batch_size

    def __call__(self, paths):
        from ..predict import prepared_batches, preprocessing_for

        model = self.model()
        layer = self.layer or model.feature_layer
        good, rows, failed = [], [], []
        for _, chunk, pixels, slots, errors in prepared_batches(paths, preprocessing_for(model), self.batch_size):
            good.extend(chunk[i] for i in slots)
            failed.extend((chunk[i], reason) for i, reason in errors.items())
            if pixels is not None:
                rows.append(np.asarray(model.run(pixels, [layer])[layer], np.float32).reshape(len(pixels), -1))
        features = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        return {"paths": np.array(good, dtype=str), "features": features, **_failures(failed)}


class StatisticsTask(_Task):
    """The metrics' pass over a shard (metrics/api.py `extract_images`): its FID statistics'
    sums and the features KID and IS keep."""

    def __init__(self, source, protocol, dims, keep=(), batch_size=50, stats=True):
        super().__init__(source)
        self.protocol, self.dims, self.keep, self.batch_size, self.stats = protocol, dims, tuple(keep), batch_size, stats

    def __call__(self, paths):
        from ..metrics.api import extract_images

        part = extract_images(paths, self.model(), self.protocol, self.dims, self.keep, self.batch_size, stats=self.stats)
        out = {"count": np.array(part.count, np.int64), **_failures(part.failed)}
        if part.stats is not None:
            out["sum"], out["outer_sum"] = part.stats.totals()
        out.update({f"keep_{name}": features for name, features in part.features.items()})
        return out
