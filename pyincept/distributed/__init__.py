"""Jobs cut into shards, run in this process or on a Ray cluster, answered in input order.

    from pyincept.distributed import ModelSource, run_shards
    from pyincept.distributed.tasks import FeaturesTask
    task = FeaturesTask(ModelSource("inception_v3.npz"))
    for index, result in run_shards(task, paths, shard_size=1000, ray="local"):
        ...                                   # shard 0, 1, 2, ... each once, whatever the workers did

A job is a task (tasks.py: classify, features, statistics) over a list of inputs, cut into
shards of `shard_size` consecutive inputs. Shard i is always inputs [i S, (i + 1) S), so a
rerun knows which shards it has (`skip=`), and because every image gets the same bits alone
and in any batch (the determinism work), a shard's answer is the same on any worker.

`ray=None` runs the shards here, one after another. `ray="local"` starts a Ray instance on
this machine (127.0.0.1 only) and stops it after; any other value is `ray.init(address=...)`.
On Ray (ray_runner.py, the only module that imports ray) the shards are rows of a Ray Data
dataset mapped by a pool of stateful actors, each loading the model once; a worker that
dies has its shard retried on a restarted actor, and the shards come back in order, each once.
"""

import os
from dataclasses import dataclass

from ..errors import PyinceptError, stop_if_interrupted

LOCAL = "local"


@dataclass(frozen=True)
class ModelSource:
    """Where a worker gets its network: a pyincept weight file (a path every worker can read),
    or weights="random" with a registered `model` name (the seeded init, for study)."""

    weights: str
    model: str | None = None
    device: str = "cpu"
    algorithm: str = "winograd"

    def build(self):
        from ..models import registry

        if self.weights == "random":
            return registry.create_model(self.model or "inception_v3", device=self.device, algorithm=self.algorithm)
        network = registry.load_model(self.weights, device=self.device, algorithm=self.algorithm)
        if self.model is not None and network.spec.name != self.model:
            raise PyinceptError(f"{self.weights} holds {network.spec.name} weights, not {self.model}")
        return network


def shards(items, size):
    """[(index, items of shard index)]: consecutive runs of `size`."""
    if size < 1:
        raise PyinceptError(f"shard size must be at least 1, got {size}")
    return [(i, list(items[start : start + size])) for i, start in enumerate(range(0, len(items), size))]


def run_shards(task, items, shard_size, ray=None, workers=None, threads=None, skip=(), progress=None):
    """Yield (shard index, task(shard's items)) for every shard not in `skip`, in index order.

    progress(n): called with each finished shard's item count. workers, threads: Ray actors
    and threads per actor (defaults: the cluster's CPUs in actors of 2 threads); here, the
    threads of this process (default: as configured).
    """
    todo = [(i, part) for i, part in shards(items, shard_size) if i not in set(skip)]
    if ray is None:
        if threads:
            from ..kernels.cpu import set_num_threads

            set_num_threads(threads)
        for index, part in todo:
            stop_if_interrupted()
            result = task(part)
            if progress:
                progress(len(part))
            yield index, result
        return
    if not ray_available():
        raise PyinceptError("--ray needs Ray: pip install \"pyincept[ray]\"")
    from .ray_runner import run_on_ray

    yield from run_on_ray(task, todo, ray, workers, threads, progress)


def check_address(address):
    """A --ray value: "local", or an address for ray.init (host:port, ray://host:port, auto)."""
    if not address or not str(address).strip():
        raise PyinceptError("--ray needs an address: local, auto, HOST:PORT or ray://HOST:PORT")
    return str(address).strip()


def ray_available():
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
