"""One measurement in a fresh process: `python -m benchmarks.worker TASK [options]`.

The suite (`python -m benchmarks`) starts one of these per measurement, one at a time,
so every engine runs alone: its own imports, its own thread pools, its own peak memory.
Thread counts arrive through the environment (PYINCEPT_NUM_THREADS, OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS, set by the suite, and PYINCEPT_SIMD for `pyincept-avx2`) and `--threads` (torch, onnxruntime). The model is
`--model` (a registry name, default inception_v3) and its input size `--size` (the suite
passes the model's own; a torch or onnxruntime worker never imports pyincept to look it up).

Each task prints its result as one line, `BENCH-RESULT {json}`, last on stdout.

    prepare      write the weights for every engine (engines.prepare)
    time         batch-1 latency and batch-B throughput of one engine; saves its logits
    rss          peak resident memory of one engine: load, warm-up, one timed pass
    coldstart    pyincept: import, load the weight file, first batch-1 forward
    layers       pyincept: time of each stage of `model.stages` at batch 1
    determinism  pyincept: an image alone vs inside a batch; two runs bit-for-bit
    scale        pyincept: time and peak memory at one batch size and input size
    simd         pyincept's micro-kernel here, its FMA peak on one core per SIMD path,
                 and the OpenBLAS kernel numpy loads beside it
    gemm         one core's GFLOP/s on the model's own GEMM shapes (GEMM_SHAPES): pyincept's
                 gemm_into, numpy's np.matmul, torch.matmul

Nothing heavy is imported at module level: `coldstart` starts its clock before numpy.
"""

import argparse
import json
import resource
import sys
import time

RESULT_PREFIX = "BENCH-RESULT "
INPUT_SEED = 1234        # the timed inputs: the same images for every engine
ACCURACY_SEED = 7        # the accuracy input: 2 images, logits saved per engine


def peak_rss_mib():
    """The process's high-water resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def images(n, size=299, seed=INPUT_SEED):
    """n deterministic NHWC float32 images, standard normal (what He-init weights expect)."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def clock(fn, repeats, warmups=1):
    """Seconds per call of fn(), `repeats` times, after `warmups` untimed calls."""
    return timed(fn, repeats, warmups)[0]


def timed(fn, repeats, warmups=1):
    """(seconds per call, usage): usage is what the timed calls cost the whole process, all
    threads together: CPU seconds, wall seconds, and involuntary context switches (how often
    the kernel took a core away from us: a sign that other processes were competing)."""
    for _ in range(warmups):
        fn()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage = {"cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
             "wall_s": sum(times), "involuntary_switches": after.ru_nivcsw - before.ru_nivcsw}
    return times, usage


# --- tasks -----------------------------------------------------------------------------


def task_prepare(args):
    from benchmarks import engines

    return {"written": engines.prepare(args.workdir, args.seed, args.model), "aux_left_out": engines.aux_left_out(args.model)}


def task_time(args):
    """Timings per batch size (lists of seconds); logits of the accuracy input saved as .npy."""
    import numpy as np

    from benchmarks import engines

    t0 = time.perf_counter()
    runner = engines.load(args.engine, args.workdir, args.threads, args.model)
    load_s = time.perf_counter() - t0
    x_all = images(max(args.batches), size=args.size)
    out = {"load_s": load_s, "times": {}, "usage": {}}
    for batch, repeats in zip(args.batches, args.repeats):
        x = runner.to_native(x_all[:batch])
        # Batch 1 gets two warm-ups: the first call pays JIT compilation and first-touch pages.
        times, usage = timed(lambda: runner.forward(x), repeats, warmups=2 if batch == 1 else 1)
        out["times"][str(batch)] = times
        out["usage"][str(batch)] = usage
    if args.logits_out:
        np.save(args.logits_out, runner(images(2, size=args.size, seed=ACCURACY_SEED)).astype(np.float32))
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def task_rss(args):
    """Peak RSS of one engine alone: after loading, then after a warm-up and a timed pass."""
    from benchmarks import engines

    runner = engines.load(args.engine, args.workdir, args.threads, args.model)
    after_load = peak_rss_mib()
    x = runner.to_native(images(args.batch, size=args.size))
    seconds = clock(lambda: runner.forward(x), repeats=1, warmups=1)[0]
    return {"batch": args.batch, "after_load_mib": after_load, "peak_rss_mib": peak_rss_mib(), "seconds": seconds}


def task_coldstart(args):
    """import pyincept + load the weight file + first batch-1 forward, timed from before numpy."""
    t0 = time.perf_counter()
    import pyincept

    t_import = time.perf_counter()
    path = f"{args.workdir}/pyincept.npz"       # as engines.pyincept_model builds it, without importing that
    model = pyincept.inception_v3(path) if args.model == "inception_v3" else pyincept.create_model(args.model, path)
    t_load = time.perf_counter()
    model(images(1, size=args.size))
    t_first = time.perf_counter()
    return {"import_s": t_import - t0, "load_s": t_load - t_import, "first_forward_s": t_first - t_load,
            "total_s": t_first - t0, "peak_rss_mib": peak_rss_mib()}


def run_stages(model, x, on_stage):
    """Run one image stage by stage exactly as `Network.run` does (through the kernel
    set's `map_batch`, so with the same threads; no taps wanted, aux heads not run),
    calling on_stage(stage, seconds) after each."""
    from pyincept.layers import Taps

    def staged(batch):
        taps = Taps([])
        y = model.ops.to_device(x[batch])
        for stage in model.stages:
            t0 = time.perf_counter()
            if stage.name == "fc":
                y = y.reshape(y.shape[0], -1)                              # (N, 2048) in v3
            y = stage(y, taps)
            on_stage(stage, time.perf_counter() - t0)
        return model.ops.to_host(y)

    assert len(x) == 1, "stage timings are for one image"
    return model.ops.map_batch(staged, 1)[0]


def task_layers(args):
    """Per-stage seconds at batch 1 (every repeat), the end-to-end seconds, and each stage's MACs."""
    import numpy as np

    import pyincept
    from benchmarks.engines import pyincept_model
    from pyincept.summary import layer_table

    model = pyincept_model(pyincept, args.model, f"{args.workdir}/pyincept.npz")
    x = images(1, size=args.size)
    np.testing.assert_array_equal(run_stages(model, x, lambda s, t: None), model(x))   # same computation
    samples = {s.name: [] for s in model.stages}
    whole = []
    for _ in range(2):                                              # warm-up
        run_stages(model, x, lambda s, t: None)
    for _ in range(args.repeats):                                   # staged and whole passes alternate: same load
        run_stages(model, x, lambda s, t: samples[s.name].append(t))
        whole += clock(lambda: model(x), 1, warmups=0)
    macs = {r["name"]: r["macs"] for r in layer_table((args.size, args.size), model=args.model)}
    stages = [{"name": s.name, "kind": type(s).__name__, "times": samples[s.name], "macs": macs[s.name]}
              for s in model.stages]
    return {"stages": stages, "whole_times": whole, "network": type(model).__name__, "aux": list(model.aux)}


def task_determinism(args):
    """Each image alone vs inside one batch (max relative difference); repeated runs bit-for-bit."""
    import numpy as np

    import pyincept
    from benchmarks.engines import pyincept_model
    from pyincept.kernels import gemm

    model = pyincept_model(pyincept, args.model, f"{args.workdir}/pyincept.npz")
    x = images(args.batch, size=args.size)
    batched = model(x)
    alone = np.concatenate([model(x[i : i + 1]) for i in range(args.batch)])
    scale = float(np.abs(batched).max())
    return {
        "batch": args.batch,
        "max_abs_logit": scale,
        "alone_vs_batch_identical": bool(np.array_equal(alone, batched)),
        "alone_vs_batch_max_abs": float(np.abs(alone - batched).max()),
        "alone_vs_batch_max_rel": float(np.abs(alone - batched).max() / scale),
        "top1_agree": bool((alone.argmax(1) == batched.argmax(1)).all()),
        "batch_rerun_identical": bool(np.array_equal(model(x), batched)),
        "single_rerun_identical": bool(np.array_equal(model(x[:1]), alone[:1])),
        "simd": gemm.simd().name,
    }


def task_scale(args):
    import pyincept
    from benchmarks.engines import pyincept_model
    from pyincept.summary import layer_table, totals

    model = pyincept_model(pyincept, args.model, f"{args.workdir}/pyincept.npz")
    after_load = peak_rss_mib()
    x = images(args.batch, size=args.size)
    times = clock(lambda: model(x), args.repeats, warmups=1)
    peak = peak_rss_mib()
    macs = totals(layer_table((args.size, args.size), model=args.model))["macs"]   # after the peak is read: it runs a model too
    return {"batch": args.batch, "size": args.size, "times": times, "after_load_mib": after_load,
            "peak_rss_mib": peak, "macs_per_image": macs}


# Inception v3's own GEMMs at batch 1, 299x299: M rows (output pixels), K depth (R*S*C), N
# columns (output channels); kernels/gemm.py calls the same three M, D and K.
GEMM_SHAPES = [
    ("Conv2d_2b_3x3, im2col", 21609, 288, 64),
    ("Mixed_5b, fused 1x1s", 1225, 192, 208),
    ("Mixed_6e, fused 1x1s", 289, 768, 768),
    ("Mixed_7b.branch3x3dbl_2, im2col", 64, 4032, 384),
    ("square, not in v3 (reference)", 2048, 2048, 2048),
]
# Every model's, at batch 1 and its own input size; GoogLeNet's at 224x224 (its fused 1x1s
# leave out branch4, whose max pool does not commute with the conv: fusion.py).
GEMM_SHAPES_BY_MODEL = {
    "inception_v3": GEMM_SHAPES,
    "inception_v3_fid": GEMM_SHAPES,          # the same convolutions; its blocks differ in the pools
    "googlenet": [
        ("conv1, im2col", 12544, 147, 64),
        ("conv3, im2col", 3136, 576, 192),
        ("inception3a, fused 1x1s", 784, 192, 176),
        ("inception4e, fused 1x1s", 196, 528, 448),
        ("inception5b.branch2.1, im2col", 49, 1728, 384),
        ("square, not in GoogLeNet (reference)", 2048, 2048, 2048),
    ],
}


def openblas_kernels():
    """The kernel (threadpoolctl's `architecture`) of each BLAS this process has loaded, once
    each (numpy's and scipy's OpenBLAS are two libraries, usually on one kernel)."""
    from threadpoolctl import threadpool_info

    return list(dict.fromkeys(lib.get("architecture") for lib in threadpool_info() if lib["user_api"] == "blas"))


def gemm_paths(in_use, runnable):
    """The SIMD paths whose products the gemm task times: the one pyincept runs here, and
    AVX2 beside AVX-512 (what the `pyincept-avx2` engine runs)."""
    return [in_use] + (["avx2"] if in_use == "avx512" and "avx2" in runnable else [])


def task_simd(args):
    """The micro-kernel pyincept runs in this environment (PYINCEPT_SIMD, else the CPU's
    best), and `gemm.peak_gfma` for every path this CPU can run: the micro-kernel alone on
    L1-resident operands, one core, about `--seconds` each. It is the roof of the report's
    `% of FMA peak`: no product of pyincept's can do more FMAs per second on a core."""
    import os

    from pyincept.kernels import gemm                              # imports numpy, so its OpenBLAS

    runnable = gemm.runnable_paths()
    return {"path": gemm.simd().name, "forced": os.environ.get("PYINCEPT_SIMD") or None, "runnable": runnable,
            "peak_gfma": {p: gemm.peak_gfma(args.seconds, gemm.SIMD_PATHS[p]) for p in runnable},
            "seconds": args.seconds, "openblas": openblas_kernels()}


def task_gemm(args):
    """Seconds per float32 product C = A @ B of each shape, on ONE core, every sample:

    `pyincept <path>`: `gemm.gemm_into` with the weights B packed into panels beforehand (as
    at load), for each of `gemm_paths`; `numpy`: np.matmul with numpy's BLAS held to one
    thread (threadpoolctl); `torch`: torch.matmul at torch.set_num_threads(1), when torch is
    installed. One core on each side, so the numbers compare the matrix products themselves,
    not how each library splits work between threads.
    """
    import numpy as np
    from threadpoolctl import threadpool_limits

    from benchmarks import engines
    from pyincept.kernels import gemm

    rng = np.random.default_rng(0)
    shapes = [(name, rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32))
              for name, M, K, N in GEMM_SHAPES_BY_MODEL[args.model]]
    paths = gemm_paths(gemm.simd().name, gemm.runnable_paths())

    def seconds(product, *operands, **out):
        """Every sample of product(*operands, **out), about args.seconds of them."""
        first = clock(lambda: product(*operands, **out), 1, warmups=1)     # the untimed call may compile
        repeats = max(3, min(50, int(args.seconds / max(first[0], 1e-6))))
        return first + clock(lambda: product(*operands, **out), repeats - 1, warmups=0)

    rows = []
    for name, a, b in shapes:
        (M, K), N = a.shape, b.shape[1]
        c, want = np.empty((M, N), np.float32), np.empty((M, N), np.float32)
        times = {}
        with threadpool_limits(1, user_api="blas"):
            times["numpy"] = seconds(np.matmul, a, b, out=want)
        for path in paths:
            panels = gemm.pack_weights(b, gemm.SIMD_PATHS[path])      # once, as at load: not timed
            times[f"pyincept {path}"] = seconds(gemm.gemm_into, a, panels, c)
            if np.abs(c - want).max() > 1e-3 * np.abs(want).max():    # timed a real product, not garbage
                raise RuntimeError(f"{name}: pyincept's {path} product differs from np.matmul's")
        rows.append({"name": name, "M": M, "K": K, "N": N, "times": times})
    if engines.installed("torch"):
        import torch

        torch.set_num_threads(1)
        for row, (name, a, b) in zip(rows, shapes):
            a, b = torch.from_numpy(a), torch.from_numpy(b)
            row["times"]["torch"] = seconds(torch.matmul, a, b, out=torch.empty(a.shape[0], b.shape[1]))
    return {"shapes": rows, "paths": paths, "libraries": [f"pyincept {p}" for p in paths] + ["numpy"] + (
        ["torch"] if engines.installed("torch") else [])}


TASKS = {
    "prepare": task_prepare, "time": task_time, "rss": task_rss, "coldstart": task_coldstart,
    "layers": task_layers, "determinism": task_determinism, "scale": task_scale, "simd": task_simd,
    "gemm": task_gemm,
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("engine", nargs="?", default="pyincept")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, nargs="+", default=[5])
    parser.add_argument("--model", default="inception_v3", help="a registry name (pyincept.models())")
    parser.add_argument("--size", type=int, default=299, help="input size (square): the model's, or a scale point's")
    parser.add_argument("--seconds", type=float, default=0.5, help="gemm: about this long per shape and library; simd: per path")
    parser.add_argument("--logits-out")
    args = parser.parse_args(argv)
    if args.task != "time":
        args.repeats = args.repeats[0]
    elif len(args.repeats) != len(args.batches):
        parser.error("--repeats needs one count per --batches entry")
    result = TASKS[args.task](args)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
