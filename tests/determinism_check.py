"""Every layer's output for each image alone, against the same image everywhere else it
can run: inside other batches, at other thread counts and micro-batches, and beside
concurrent callers on one model or on two; and every layer's bits of every model, as
fingerprints, for the comparison across environments. Run by tests/test_determinism.py
in a fresh process per environment (OPENBLAS_CORETYPE is read when OpenBLAS loads,
PYINCEPT_SIMD when the first weights are packed); prints one JSON line:

    {"blas": [...], "simd": name, "mismatches": [...], "compared": n, "logits_file": path,
     "taps": {"model image layer": sha256, ...}}

`blas` is threadpoolctl's report of the OpenBLAS kernel that loaded, `simd` the GEMM's
micro-kernel, `mismatches` names every (run, image, layer) whose bits differ from the
image alone (empty when the promise holds), and `taps` fingerprints every layer of
Inception v3, GoogLeNet and the FID network for two lone photographs. --taps-only skips
the batch, thread and concurrency runs.

    python tests/determinism_check.py OUT.npy [--taps-only]
"""

import hashlib

import json
import sys
import threading

import numpy as np
from threadpoolctl import threadpool_info

import pyincept
from photos import photo_batch
from pyincept import config
from pyincept.kernels import cpu, gemm

IMAGES = 8
# (label, threads, micro-batch, images): the batch-mates, the batch size, the split
# into micro-batches and shards, and the thread count all change; the images do not.
RUNS = [
    ("batch [0:8], 2 threads, micro-batches of 2", 2, 2, slice(0, 8)),
    ("batch [0:3], 1 thread, micro-batches of 4", 1, 4, slice(0, 3)),
    ("batch [3:8], 3 threads, micro-batches of 1", 3, 1, slice(3, 8)),
    ("batch [5:7], 2 threads, micro-batches of 2", 2, 2, slice(5, 7)),
    ("image [2:3] alone on 1 thread (its layers unsplit)", 1, 2, slice(2, 3)),
]
# Concurrent callers, each its own batch, all at once on 2 threads.
CALLERS = [slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 8), slice(3, 4)]


def images(size):
    """IMAGES real photographs and their mirror images, standardised for the He-init weights."""
    x = photo_batch(size)
    x = np.concatenate([x, x[:, :, ::-1]])[:IMAGES]
    return np.ascontiguousarray((x - x.mean()) / x.std(), np.float32)


def main(out_path, size=(299, 299)):
    model = pyincept.inception_v3(seed=0)
    twin = pyincept.inception_v3(seed=0)                       # a second model, same weights
    names = model.layer_names()                                # every layer, aux head included
    x = images(size)
    cpu.set_num_threads(2)
    alone = [model.run(x[i : i + 1], names) for i in range(len(x))]
    mismatches, compared = [], 0

    def compare(label, images, got):
        nonlocal compared
        for j, i in enumerate(range(len(x))[images]):
            for name in names:
                compared += 1
                if not np.array_equal(got[name][j : j + 1], alone[i][name]):
                    mismatches.append(f"{label}: image {i}, {name}")

    for label, threads, micro_batch, images_ in RUNS:
        config.MICRO_BATCH = micro_batch
        cpu.set_num_threads(threads)
        compare(label, images_, model.run(x[images_], names))
    config.MICRO_BATCH = 2
    cpu.set_num_threads(2)

    for models, label in [((model,), "one model"), ((model, twin), "two models")]:
        results, start = {}, threading.Barrier(len(CALLERS))

        def call(k, images_):
            start.wait()                                       # every caller at once
            for repeat in range(2):
                results[k, repeat] = models[k % len(models)].run(x[images_], names)

        threads = [threading.Thread(target=call, args=(k, s)) for k, s in enumerate(CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (k, repeat), got in sorted(results.items()):
            compare(f"{len(CALLERS)} concurrent callers on {label}, caller {k} {CALLERS[k]}, call {repeat + 1}",
                    CALLERS[k], got)

    np.save(out_path, np.concatenate([a["fc"] for a in alone]))
    return mismatches, compared


def tap_fingerprints():
    """{"model image layer": SHA-256 of that output's bytes} for two lone photographs through
    every layer of each model of the family, at its own input size."""
    fingerprints = {}
    cpu.set_num_threads(2)
    for name in pyincept.models():
        model = pyincept.create_model(name, seed=0)
        size = model.spec.input_size
        x = images(size)[:2]
        x = np.ascontiguousarray((x - x.mean()) / x.std(), np.float32)
        names = model.layer_names()
        for i in range(len(x)):
            for layer, y in model.run(x[i : i + 1], names).items():
                fingerprints[f"{name} {i} {layer}"] = hashlib.sha256(np.ascontiguousarray(y).tobytes()).hexdigest()
    return fingerprints


if __name__ == "__main__":
    out = sys.argv[1]
    mismatches, compared = ([], 0) if "--taps-only" in sys.argv else main(out)
    blas = [lib.get("architecture") or lib.get("internal_api") for lib in threadpool_info() if lib["user_api"] == "blas"]
    print(json.dumps({"blas": blas, "simd": gemm.simd().name, "mismatches": mismatches, "compared": compared,
                      "logits_file": out, "taps": tap_fingerprints()}))
