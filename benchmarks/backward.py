"""The backward pass against torch eager on the CPU: the input gradient of a logit, one
fine-tuning step, and the memory of a batch-8 input gradient.

    python -m benchmarks --backward [--rounds 2] [--threads 2] [--out FILE]
    (the same as python -m benchmarks.backward ...)

Inception v3 with the suite's shared random weights (`engines.prepare`: pyincept's .npz and
the same weights as a torchvision state dict), 299x299 standard-normal inputs. Every
measurement runs in a fresh process, one at a time, the engines' order rotated over rounds,
with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset as on a user's machine.

    measurement       pyincept                                   torch eager (float32)
    input gradient    model.grad(x, targets)                     x.requires_grad; logits[n, t_n].sum().backward()
    fine-tuning step  finetune.train_steps, one batch of 32       Mixed_7c + fc: forward, cross-entropy, backward,
                      from Mixed_7b's output (cached, as          SGD(momentum 0.9, weight decay) step
                      fine-tuning caches it)
    peak RSS          ru_maxrss of load + one batch-8 input gradient (pyincept's forward alone beside it)

Times are the median of the repeats after one warm-up call, per process; the report takes
each engine's best round.
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "BACKWARD-RESULT "
UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ENGINES = ("pyincept", "torch")
REPEATS = {1: 5, 8: 3}                 # input-gradient calls timed per process, by batch
STEP_BATCH, STEP_REPEATS = 32, 3
TARGETS = {"grad": 0.6, "step": 0.8, "rss_vs_torch": 0.5, "rss_vs_forward": 3.0}


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 299, 299, 3)).astype(np.float32), rng.integers(0, 1000, batch)


def _torch_model(workdir, threads):
    import torch

    from benchmarks import engines

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    return engines.torchvision_model(torch.load(workdir / engines.TORCH_WEIGHTS, weights_only=True))


def _median_seconds(call, repeats):
    call()                                                             # warm-up: caches, first-touch pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def worker(kind, engine, batch, workdir, threads):
    """One measurement in this process; prints PREFIX + JSON."""
    from benchmarks import engines

    x, targets = _inputs(batch)
    out = {"kind": kind, "engine": engine, "batch": batch}
    if engine == "pyincept":
        import pyincept

        pyincept.set_num_threads(threads)
        model = pyincept.load_model(workdir / engines.PYINCEPT_WEIGHTS)
        out["rss_loaded"] = _rss_mib()
        if kind == "grad":
            out["seconds"] = _median_seconds(lambda: model.grad(x, targets), REPEATS[batch])
        elif kind == "rss":
            model.grad(x, targets)
        elif kind == "rss-forward":
            model(x)
        else:                                                          # one fine-tuning step from Mixed_7b's output
            from pyincept.finetune import train_steps, trainable_keys, training_network

            params = {k: np.asarray(v, np.float32) for k, v in model.reload().items()}
            net = training_network(model, 1000, params)
            keys = trainable_keys(net, "Mixed_7c")
            inputs = np.abs(np.random.default_rng(1).standard_normal((batch, 8, 8, 2048))).astype(np.float32)
            step = [np.arange(batch)]
            out["seconds"] = _median_seconds(
                lambda: train_steps(net, "Mixed_7c", inputs, targets, params, keys, step, learning_rate=1e-3, l2=1e-4),
                STEP_REPEATS)
    else:
        import torch
        import torch.nn.functional as F

        model = _torch_model(workdir, threads)
        out["rss_loaded"] = _rss_mib()
        t = torch.from_numpy(targets)
        if kind in ("grad", "rss"):
            for p in model.parameters():                               # the input's gradient only, as pyincept's
                p.requires_grad_(False)
            native = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

            def call():
                xt = native.clone().requires_grad_(True)
                model(xt)[torch.arange(batch), t].sum().backward()
                return xt.grad

            if kind == "grad":
                out["seconds"] = _median_seconds(call, REPEATS[batch])
            else:
                call()
        else:
            trained = list(model.Mixed_7c.parameters()) + list(model.fc.parameters())
            ids = {id(p) for p in trained}
            for p in model.parameters():
                p.requires_grad_(id(p) in ids)
            opt = torch.optim.SGD(trained, lr=1e-3, momentum=0.9, weight_decay=1e-4)
            inputs = torch.from_numpy(np.abs(np.random.default_rng(1).standard_normal((batch, 2048, 8, 8)))
                                      .astype(np.float32))

            def call():
                logits = model.fc(torch.flatten(F.adaptive_avg_pool2d(model.Mixed_7c(inputs), 1), 1))
                loss = F.cross_entropy(logits, t)
                opt.zero_grad()
                loss.backward()
                opt.step()

            out["seconds"] = _median_seconds(call, STEP_REPEATS)
    out["rss_peak"] = _rss_mib()
    print(PREFIX + json.dumps(out), flush=True)
    return 0


def run(args):
    from benchmarks import engines, report

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pyincept-backward-"))
    if not (workdir / engines.TORCH_WEIGHTS).exists():
        # In a process of its own: Linux keeps a process's high-water RSS across exec, so a
        # parent grown by torch would hand its peak to every worker it starts.
        print(f"[backward] weights in {workdir}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", "import sys; from benchmarks import engines; "
                        "engines.prepare(sys.argv[1], int(sys.argv[2]))", str(workdir), str(args.seed)],
                       cwd=ROOT, check=True, capture_output=True)
    env = dict(os.environ)
    n = str(args.threads)
    env.update({"PYINCEPT_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n})
    for k in UNSET:
        env.pop(k, None)
    plan = [("grad", 1), ("grad", 8), ("step", STEP_BATCH)]
    results, errors = [], []

    def sub(kind, engine, batch):
        cmd = [sys.executable, "-m", "benchmarks.backward", "--worker", kind, engine, str(batch), str(workdir),
               "--threads", n]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        lines = [line for line in p.stdout.splitlines() if line.startswith(PREFIX)]
        if p.returncode or not lines:
            errors.append(f"{kind} {engine} batch {batch}: exit {p.returncode}: "
                          f"{(p.stderr.strip().splitlines() or [''])[-1]}")
            return
        results.append(json.loads(lines[-1][len(PREFIX):]))

    for r in range(args.rounds):
        for kind, batch in plan:
            for engine in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
                print(f"[backward] round {r + 1}: {kind} {engine} batch {batch}", file=sys.stderr, flush=True)
                sub(kind, engine, batch)
    for kind, engine in (("rss", "pyincept"), ("rss", "torch"), ("rss-forward", "pyincept")):
        print(f"[backward] memory: {kind} {engine} batch 8", file=sys.stderr, flush=True)
        sub(kind, engine, 8)

    def best(kind, engine, batch):
        times = [o["seconds"] for o in results if (o["kind"], o["engine"], o["batch"]) == (kind, engine, batch)]
        return min(times) if times else None

    def rss(kind, engine):
        return next((o for o in results if (o["kind"], o["engine"]) == (kind, engine)), None)

    m = report.machine()
    lines = [
        "# The backward pass: pyincept against torch eager",
        "",
        f"`python -m benchmarks --backward {' '.join(args.argv)}`".replace(" `", "`"),
        f"on {datetime.date.today()}: {m['cpu']}, {m['usable_cpus']} usable CPUs, {args.threads} threads for every "
        f"engine, {args.rounds} round(s); Inception v3, the suite's random weights (seed {args.seed}), 299x299. "
        "OpenBLAS variables unset in every process. Method: `benchmarks/backward.py`'s docstring.",
        "",
        "| measurement | batch | pyincept s | torch s | pyincept ÷ torch | target |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for kind, batch in plan:
        ours, theirs = best(kind, "pyincept", batch), best(kind, "torch", batch)
        name = "forward + input gradient" if kind == "grad" else "one fine-tuning step (Mixed_7c onward)"
        target = TARGETS[kind]
        if ours and theirs:
            ratio = ours / theirs
            verdicts.append((f"{name}, batch {batch}: ≤ {target}x torch's time", ratio, ratio <= target))
            lines.append(f"| {name} | {batch} | {ours:.3f} ({ours / batch * 1e3:.0f} ms/img) | {theirs:.3f} | "
                         f"{ratio:.2f}x | ≤ {target}x |")
    ours, theirs, forward = rss("rss", "pyincept"), rss("rss", "torch"), rss("rss-forward", "pyincept")
    if ours and theirs and forward:
        lines += ["", "| peak RSS, batch 8 (MiB) | after loading | peak |", "|---|---|---|",
                  f"| pyincept input gradient | {ours['rss_loaded']:.0f} | {ours['rss_peak']:.0f} |",
                  f"| torch input gradient | {theirs['rss_loaded']:.0f} | {theirs['rss_peak']:.0f} |",
                  f"| pyincept forward alone | {forward['rss_loaded']:.0f} | {forward['rss_peak']:.0f} |"]
        verdicts.append(("peak RSS of the batch-8 input gradient ≤ 0.5x torch's", ours["rss_peak"] / theirs["rss_peak"],
                         ours["rss_peak"] / theirs["rss_peak"] <= TARGETS["rss_vs_torch"]))
        verdicts.append(("... and ≤ 3x pyincept's own forward peak", ours["rss_peak"] / forward["rss_peak"],
                         ours["rss_peak"] / forward["rss_peak"] <= TARGETS["rss_vs_forward"]))
    lines += ["", "## Targets (issue 25)", "", "Informational: the exit status never depends on these.", ""]
    lines += [f"- **{'PASS' if ok else 'FAIL'}** {what}: {value:.2f}x" for what, value, ok in verdicts]
    return report.finish(lines, errors, args.out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks --backward", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, engine order alternated (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared random weights")
    parser.add_argument("--workdir", help="keep the weight files here (reused when present)")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "ENGINE", "BATCH", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.worker:
        kind, engine, batch, folder = args.worker
        return worker(kind, engine, int(batch), Path(folder), args.threads)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
