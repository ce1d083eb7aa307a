"""pyincept against PyTorch and ONNX Runtime, on the same weights and the same machine.

    python -m benchmarks [--model NAME] [--quick] [--no-scale] [--out FILE]      (from the repository root)
    python -m benchmarks --backward [--rounds 2] [--out FILE]    the backward pass (benchmarks/backward.py)

One run measures one model of the registry (`--model`, default inception_v3; googlenet at
224x224 too), each measurement in a fresh process started one at a time
(`benchmarks/worker.py`): batch-1 latency and batch-8/32 throughput of every engine
(interleaved over rounds), peak memory of each engine alone, pyincept's start-up with a
warm and a cold Numba cache, the micro-kernel's FMA peak on one core (the roof every
`% of FMA peak` divides by), one core's matrix product on the model's own GEMM shapes
(pyincept's, numpy's, torch's), the time of each of pyincept's stages, its determinism,
and how it scales with batch and input size. The Markdown report goes to stdout
(progress to stderr).
`benchmarks/README.md` says what each number means.

Exit status: 0 when every measurement ran (engines that are not installed are skipped
and say so), 1 when a measurement crashed; never the targets, which are informational.
"""

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import engines, report
from benchmarks.worker import GEMM_SHAPES_BY_MODEL, RESULT_PREFIX

ROOT = Path(__file__).resolve().parent.parent     # where `python -m benchmarks.worker` resolves
# Set on some machines to dodge old OpenBLAS bugs; they force an older sgemm kernel (Haswell's AVX2
# at half the AVX-512 kernel's speed on Zen 4/5) and a user's machine has neither.
OPENBLAS_FORCED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

FULL = {
    "quick": False,
    "rounds": 2,                       # every engine once per round, engine order rotated
    "batches": [1, 8, 32],
    "repeats": [15, 4, 2],             # timed passes per batch per round, after warm-up
    "rss_engines": list(engines.ENGINES),
    "rss_batch": 32,
    "layer_repeats": 30,
    "determinism_batch": 8,
    "scale_size": 299,
    "scale_batches": [1, 2, 4, 8, 16, 32, 64],
    "scale_sizes": [299, 399, 499, 599],
    "scale_size_batch": 4,
    "scale_passes": 96,                # images per scale point (at least 1 timed pass, at most 3)
    "cold_start": True,
    "gemm_seconds": 0.5,
    "peak_seconds": 0.5,               # the micro-kernel's FMA peak, per SIMD path
}
QUICK = {
    **FULL,
    "quick": True,
    "rounds": 1,
    "batches": [1, 2],
    "repeats": [3, 2],
    "rss_engines": ["pyincept"],
    "rss_batch": 2,
    "layer_repeats": 3,
    "determinism_batch": 2,
    "scale_batches": [1, 2],
    "scale_sizes": [299, 347],
    "scale_size_batch": 1,
    "scale_passes": 2,
    "cold_start": False,
    "gemm_seconds": 0.05,
}


class Suite:
    """Runs workers one at a time and collects what they report: every worker on `model`
    (a registry name) at input size `size` (square) unless its arguments say `--size`."""

    def __init__(self, workdir, threads, verbose=True, model=engines.DEFAULT_MODEL, size=299, openblas_as_set=False):
        self.workdir, self.threads, self.verbose = Path(workdir), threads, verbose
        self.openblas_as_set = openblas_as_set
        self.model, self.size = model, size
        self.errors = []
        self.t0 = time.perf_counter()

    def log(self, message):
        if self.verbose:
            print(f"[benchmarks {time.perf_counter() - self.t0:5.0f} s] {message}", file=sys.stderr, flush=True)

    def env(self, extra=None):
        """Each worker's environment: the thread counts, and OpenBLAS choosing its own kernel as
        on a user's machine (the OPENBLAS_FORCED variables unset) unless --openblas-as-set.
        pyincept reads PYINCEPT_NUM_THREADS alone; the BLAS and OpenMP counts are for the
        other engines and numpy (pyincept's forward pass calls no BLAS)."""
        env = dict(os.environ)
        if not self.openblas_as_set:
            for key in OPENBLAS_FORCED:
                env.pop(key, None)
        n = str(self.threads)
        env.update({"PYINCEPT_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n})
        env.update(extra or {})
        return env

    def worker(self, task, *args, env=None, timeout=1800):
        """Run `python -m benchmarks.worker TASK ARGS` -> (result dict or None, wall seconds)."""
        cmd = [sys.executable, "-m", "benchmarks.worker", task, *map(str, args),
               "--workdir", str(self.workdir), "--threads", str(self.threads), "--model", self.model]
        if "--size" not in args:
            cmd += ["--size", str(self.size)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=self.env(env), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.errors.append(f"`{shlex.join(cmd[2:])}` ran past {timeout} s")
            return None, None
        wall = time.perf_counter() - t0
        lines = [line for line in p.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if p.returncode != 0 or not lines:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            self.errors.append(f"`{shlex.join(cmd[2:5])}` failed (exit {p.returncode}): {tail}")
            self.log(f"FAILED: {shlex.join(cmd[2:])}\n{p.stderr[-3000:]}")
            return None, wall
        return json.loads(lines[-1][len(RESULT_PREFIX):]), wall


class Refused(Exception):
    """A run that cannot be what was asked for; main prints its one line and exits 2."""


def main(argv=None):
    from pyincept.models.registry import get_spec, models

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--backward" in argv:                        # the backward pass's suite: benchmarks/backward.py
        from benchmarks import backward

        return backward.main([a for a in argv if a != "--backward"])
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: few repeats, batch 1 and 2, tiny scale table, one memory measurement, "
                             "no cold-cache start (under 90 s on 2 cores)")
    parser.add_argument("--model", default=engines.DEFAULT_MODEL, choices=models(),
                        help=f"the network every engine runs, at its own input size (default {engines.DEFAULT_MODEL})")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale section (batch and input size sweeps)")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--json", help="also write every raw sample (seconds, MiB) to this JSON file")
    parser.add_argument("--engines", default=",".join(engines.default_engines()),
                        help=f"comma-separated subset of {', '.join(engines.ENGINES)} (default: all but "
                             "pyincept-avx2, which joins them on a CPU with AVX-512)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared random weights")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved timing rounds")
    parser.add_argument("--workdir", help="keep the weight files here (default: a temporary folder, removed after)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also time pyincept as it was at git revision REV, interleaved with today's: "
                             "the speed before and after a change, from one run")
    parser.add_argument("--openblas-as-set", action="store_true",
                        help=f"keep {' and '.join(OPENBLAS_FORCED)} in the engines' processes (default: unset, as users run)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    plan = {**(QUICK if args.quick else FULL), "threads": args.threads, "seed": args.seed, "no_scale": args.no_scale,
            "openblas_as_set": args.openblas_as_set,
            "openblas_env": {k: os.environ[k] for k in OPENBLAS_FORCED if k in os.environ}}
    forced = report.forced_kernel_warning(plan, report.machine())
    if forced and not args.quiet:
        print(f"python -m benchmarks: warning: {forced}", file=sys.stderr)
    spec = get_spec(args.model)
    size = spec.input_size[0]                       # every registered model is square; so are the scale points
    plan.update({"model": args.model, "model_title": spec.title, "input_size": list(spec.input_size),
                 "scale_size": size,                # the input-size sweep keeps v3's steps, from the model's size
                 "scale_sizes": [s - FULL["scale_size"] + size for s in plan["scale_sizes"]]})
    if args.rounds:
        plan["rounds"] = args.rounds
    chosen = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in chosen if e not in engines.ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(engines.ENGINES)}")
    if args.baseline:
        chosen.insert(chosen.index("pyincept") + 1 if "pyincept" in chosen else 0, engines.BASELINE)
        plan["baseline"] = args.baseline

    started = datetime.datetime.now().astimezone()
    loadavg_start = os.getloadavg()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pyincept-bench-"))
    try:
        res = run(plan, chosen, workdir, args.quiet)
    except Refused as e:
        print(f"python -m benchmarks: error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    res.update({
        "command": shlex.join(["python", "-m", "benchmarks", *argv]),
        "date": started.strftime("%Y-%m-%d %H:%M %Z"),
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "machine": report.machine(),
        "versions": report.versions(),
        "numpy_blas": report.numpy_blas(),
        "source": report.source(ROOT),
    })
    text = report.render(res)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 1 if res["errors"] else 0


def run(plan, chosen, workdir, quiet=False):
    """Every measurement of the plan; returns the results dict `report.render` reads."""
    model = plan.get("model", engines.DEFAULT_MODEL)
    suite = Suite(workdir, plan["threads"], verbose=not quiet, model=model,
                  size=plan.get("input_size", [plan["scale_size"]])[0], openblas_as_set=plan.get("openblas_as_set", False))
    res = {"plan": plan, "engines": {}, "times": {}, "usage": {}, "loadavg": {}, "load_s": {}, "rss": {},
           "coldstart": {}, "simd": None, "gemm": None, "layers": None, "determinism": None, "scale": None,
           "accuracy": {}, "macs_per_image": None, "prepared": {}}

    if plan.get("baseline"):
        res["baseline"] = extract_baseline(plan["baseline"], workdir / "baseline")
        if model != engines.DEFAULT_MODEL and "error" not in res["baseline"]:       # every revision has v3
            held = baseline_models(res["baseline"]["folder"])
            if model not in held:
                raise Refused(f"--baseline {plan['baseline']}: pyincept at {res['baseline']['commit']} has no "
                              f"{model} (it has {', '.join(held) or 'no model it can import'}); run without --baseline")
    suite.log(f"writing the shared weights of {model} to {workdir}")
    prepared, _ = suite.worker("prepare", "--seed", plan["seed"])
    res["prepared"] = prepared["written"] if prepared else {}
    res["aux_left_out"] = prepared.get("aux_left_out", []) if prepared else []
    onnx = engines.onnx_model(model)
    for name in chosen:
        why = engines.missing(name, workdir, model)
        if name == engines.BASELINE and why is None:
            why = res["baseline"].get("error")
        if why is None and name == "ort" and "failed" in res["prepared"].get(onnx, ""):
            why = res["prepared"][onnx]
        label = engines.label(name)
        if name == engines.BASELINE:
            label = f"pyincept at {res['baseline'].get('commit') or plan['baseline']} (baseline)"
        res["engines"][name] = {"label": label, "skipped": why}
        if why:
            suite.log(f"skipping {name}: {why}")
    names = [n for n in chosen if not res["engines"][n]["skipped"]]

    # Timing: every engine once per round, in a rotated order, each in a fresh process.
    for r in range(plan["rounds"]):
        for name in names[r % len(names):] + names[: r % len(names)] if names else []:
            suite.log(f"timing {name} (round {r + 1}/{plan['rounds']}; batches {plan['batches']})")
            out, _ = suite.worker("time", name, "--batches", *plan["batches"], "--repeats", *plan["repeats"],
                                  "--logits-out", workdir / f"logits-{name}.npy", env=engine_env(name, res))
            if out:
                for b, ts in out["times"].items():
                    res["times"].setdefault(name, {}).setdefault(int(b), []).extend(ts)
                    total = res["usage"].setdefault(name, {}).setdefault(int(b), {})
                    for key, value in out["usage"][b].items():
                        total[key] = total.get(key, 0) + value
                res["load_s"].setdefault(name, []).append(out["load_s"])
                res["loadavg"].setdefault(name, []).append(os.getloadavg()[0])
    res["accuracy"] = accuracy(workdir, [n for n in names if n in res["times"]])

    for name in [n for n in plan["rss_engines"] if n in names]:
        suite.log(f"peak memory of {name} alone, batch {plan['rss_batch']}")
        out, _ = suite.worker("rss", name, "--batch", plan["rss_batch"], env=engine_env(name, res))
        if out:
            res["rss"][name] = out

    if "pyincept" in names:
        res["coldstart"] = coldstart(suite, plan)
        suite.log("pyincept stage by stage")
        res["layers"], _ = suite.worker("layers", "--repeats", plan["layer_repeats"])
        if res["layers"]:
            res["macs_per_image"] = sum(s["macs"] for s in res["layers"]["stages"])
        suite.log("pyincept determinism")
        res["determinism"], _ = suite.worker("determinism", "--batch", plan["determinism_batch"])
    suite.log("the micro-kernel's FMA peak, one core per SIMD path")
    res["simd"], _ = suite.worker("simd", "--seconds", plan["peak_seconds"])
    res["gemm"] = matrix_product(suite, plan, model)

    if not plan["no_scale"] and "pyincept" in names:
        res["scale"] = scale(suite, plan)
    res["errors"] = suite.errors
    res["elapsed_s"] = time.perf_counter() - suite.t0
    return res


def baseline_models(folder):
    """The model names the pyincept package extracted in `folder` has: its `pyincept.models()`,
    or ["inception_v3"] for one from before the registry; [] when it cannot be imported."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import pyincept; "
             "m = getattr(pyincept, 'models', None); print(*(m() if callable(m) else ['inception_v3']))")
    p = subprocess.run([sys.executable, "-c", probe, str(Path(folder).resolve())], cwd=folder,
                       capture_output=True, text=True)
    return p.stdout.split() if p.returncode == 0 else []


def extract_baseline(rev, folder):
    """The pyincept package as it was at git revision `rev`, extracted into folder/pyincept:
    {"rev", "commit", "folder"}, or {"error"} saying why it could not be."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                                capture_output=True, text=True, check=True).stdout.strip()
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "pyincept"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        detail = detail.decode() if isinstance(detail, bytes) else detail
        return {"rev": rev, "error": f"no baseline at {rev!r}: {(detail.strip().splitlines() or [str(e)])[-1]}"}
    return {"rev": rev, "commit": commit, "folder": str(folder)}


def engine_env(name, res):
    """Extra environment for an engine's workers: its own (engines.ENVIRONMENT), and the
    baseline's worker imports its own package."""
    env = dict(engines.ENVIRONMENT.get(name, {}))
    if name == engines.BASELINE:
        env[engines.BASELINE_SOURCE] = res["baseline"]["folder"]
    return env or None


def matrix_product(suite, plan, model):
    """One core's matrix product on the model's own GEMM shapes: {"shapes": rows, "paths",
    "libraries"}, each row's raw `times` {library: seconds} with their `median` and `gflops`
    beside; {"skipped": why} for a model without shapes; None when the worker failed."""
    if model not in GEMM_SHAPES_BY_MODEL:
        return {"skipped": f"no GEMM shapes of {model} in `benchmarks/worker.py:GEMM_SHAPES_BY_MODEL`"}
    suite.log("the matrix product on the model's GEMM shapes, one core")
    out, _ = suite.worker("gemm", "--seconds", plan["gemm_seconds"])
    for row in out["shapes"] if out else []:
        macs = row["M"] * row["K"] * row["N"]                      # report.gflops counts 2 flops per MAC
        row["median"] = {lib: float(np.median(ts)) for lib, ts in row["times"].items()}
        row["gflops"] = {lib: report.gflops(macs, t) for lib, t in row["median"].items()}
    return out


def accuracy(workdir, names):
    """Each engine's logits on the accuracy input against pyincept's."""
    if "pyincept" not in names:
        return {}
    ours = np.load(workdir / "logits-pyincept.npy")
    out = {}
    for name in names:
        if name == "pyincept":
            continue
        theirs = np.load(workdir / f"logits-{name}.npy")
        top = float(np.abs(theirs).max())
        delta = float(np.abs(ours - theirs).max())
        out[name] = {"max_abs_logit": top, "max_abs_delta": delta, "relative": delta / top,
                     "top1_equal": bool((ours.argmax(1) == theirs.argmax(1)).all())}
    return out


def coldstart(suite, plan):
    """Cold: an empty NUMBA_CACHE_DIR (every kernel compiles). Warm: the second of two runs on one cache."""
    out = {}
    cache = Path(tempfile.mkdtemp(prefix="pyincept-numba-cache-"))
    try:
        env = {"NUMBA_CACHE_DIR": str(cache)} if plan["cold_start"] else None
        runs = (["cold"] if plan["cold_start"] else []) + ["warm-up", "warm"]
        for key in runs:
            suite.log(f"pyincept start-up, {key} Numba cache")
            r, wall = suite.worker("coldstart", env=env)
            if r and key != "warm-up":
                out[key] = {**r, "wall_s": wall}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out


def scale(suite, plan):
    """Fresh-process points over batch sizes (at scale_size) and input sizes (at scale_size_batch)."""
    points = {}

    def measure(batch, size):
        if (batch, size) not in points:
            repeats = max(1, min(3, plan["scale_passes"] // batch))
            suite.log(f"scale: batch {batch}, {size}x{size}, {repeats} timed pass(es)")
            points[batch, size], _ = suite.worker("scale", "--batch", batch, "--size", size, "--repeats", repeats)
        return points[batch, size]

    by_batch = [measure(b, plan["scale_size"]) for b in plan["scale_batches"]]
    by_size = [measure(plan["scale_size_batch"], s) for s in plan["scale_sizes"]]
    return {"batch": [r for r in by_batch if r], "size": [r for r in by_size if r]}


if __name__ == "__main__":
    sys.exit(main())
