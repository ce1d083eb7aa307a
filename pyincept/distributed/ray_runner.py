"""The only module that imports ray: shards as rows of a Ray Data dataset, mapped by a pool of
stateful actors (each loads its model once), answered in order.

    shard rows {shard, items}  ->  map_batches(_ShardWorker, batch_size=1, ActorPoolStrategy(size=workers))
                               ->  {shard, result}: the task's arrays packed as one .npz blob (no pickle)

Ray Data's actor pools restart a dead actor and retry its task (max_restarts and
max_task_retries default to -1 there), so a worker killed mid-run costs its shard's time, not
its answer. `preserve_order` hands the rows back in shard order; the driver still checks
that every shard came back once.
"""

import io
import logging
import os

import numpy as np

from ..errors import PyinceptError, stop_if_interrupted
from . import LOCAL, cpu_count

DEFAULT_THREADS = 2


def pack(result):
    """{name: array} -> the bytes of an .npz (strings as unicode arrays: no pickle either way)."""
    buffer = io.BytesIO()
    np.savez(buffer, **result)
    return buffer.getvalue()


def unpack(blob):
    with np.load(io.BytesIO(blob), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


class _ShardWorker:
    """One Ray actor: sets its threads, keeps the task (which loads its model on first use)."""

    def __init__(self, task, threads):
        from ..kernels.cpu import set_num_threads

        set_num_threads(threads)
        self.task = task

    def __call__(self, batch):
        shards = [int(s) for s in batch["shard"]]
        blobs = [pack(self.task([str(p) for p in items])) for items in batch["items"]]
        return {"shard": np.array(shards, np.int64), "result": np.array(blobs, dtype=object)}


def _rows(dataset):
    """The dataset's rows; an expected failure inside a worker (a PyinceptError: bad weights)
    comes out as itself, one line, not as Ray's wrapped traceback."""
    import ray

    try:
        yield from dataset.iter_rows()
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), PyinceptError) else None
        if cause is None:
            raise
        raise PyinceptError(str(cause)) from None


def connect(address):
    """ray.init for --ray ADDRESS; returns whether this call started a local instance."""
    import ray

    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    if ray.is_initialized():
        return False
    try:
        if address == LOCAL:
            # address="local": always a new instance, even where `ray start` left one running
            ray.init(address="local", num_cpus=cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                     **quiet)
            return True
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PyinceptError(f"cannot connect to the Ray cluster at {address}: {str(e).strip().splitlines()[0]}") from None
    return False


def run_on_ray(task, todo, address, workers=None, threads=None, progress=None):
    # Ray Data's plan and progress lines on stderr (their level is read when it configures
    # its loggers): the command's own progress bar says how far it is.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray

    started = connect(address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = threads or max(1, min(DEFAULT_THREADS, cpus))
        workers = workers or max(1, cpus // threads)
        if not todo:
            return
        rows = [{"shard": index, "items": [str(p) for p in items]} for index, items in todo]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
            num_cpus=threads, fn_constructor_kwargs={"task": task, "threads": threads})
        sizes = {index: len(items) for index, items in todo}
        seen = set()
        for row in _rows(dataset):
            stop_if_interrupted()
            index = int(row["shard"])
            if index in seen:                       # a retried shard answered twice: keep the first
                continue
            seen.add(index)
            if progress:
                progress(sizes[index])
            yield index, unpack(row["result"])
        missing = sorted(set(sizes) - seen)
        if missing:
            raise PyinceptError(f"the Ray job returned no answer for shard(s) {missing[:5]}")
    finally:
        if started:
            ray.shutdown()
