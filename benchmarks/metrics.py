"""pyincept's metrics against pytorch-fid and torch-fidelity: images/s from files to scores, and
the time of one FID between two 2048-d statistics against scipy's sqrtm.

    python -m benchmarks.metrics [--images 260] [--size 200] [--threads 2] [--rounds 2] [--out FILE]

Two folders of photographs (the test photos, cropped at random and resized to SIZE x SIZE,
JPEG), half the images each. One random-weight FID network (pytorch-fid's classes, batch norm
calibrated on those photos), saved by torch.save and converted by `pyincept convert`, runs in
every engine. Each measurement runs in a fresh process, one at a time, engine order rotated
over rounds; each process times its call twice and reports the second (imports, weight files
read and Numba's cache warm; every engine builds its network inside the call, as it would
for a user). Every process runs with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, as a
user's machine has them (`--openblas-as-set` keeps them), and reports the BLAS kernel it ran.

    engine                 call                                                          scores
    pyincept fid           calculate_metrics(a, b, fid=True, protocol="pytorch-fid")    FID
    pytorch-fid            fid_score.calculate_fid_given_paths([a, b], 50, "cpu", 2048, W)  FID
    pyincept fid+kid+isc   calculate_metrics(a, b, fid, kid, isc, protocol="torch-fidelity")  FID, KID, IS
    torch-fidelity         torch_fidelity.calculate_metrics(a, b, fid, kid, isc, cuda=False)  FID, KID, IS

W is pytorch-fid's own default of data-loader workers (the usable CPUs, at most 8). KID draws
subsets of a quarter of the images (torch-fidelity's 1000 would need 1000 images a folder).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted((ROOT / "tests" / "data").glob("*.jpg"))
PREFIX = "METRICS-RESULT "
ENGINES = ("pyincept-fid", "pytorch-fid", "pyincept-all", "torch-fidelity")
UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# --- setup: the photos and the network ------------------------------------------------------------


def make_photos(folder, n, size, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for part, count in (("a", n // 2), ("b", n - n // 2)):
        (folder / part).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            im = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
            w, h = im.size
            side = int(min(w, h) * rng.uniform(0.4, 0.9))
            left, top = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            im.save(folder / part / f"{i:04d}.jpg", quality=90)


def make_network(folder, seed=0):
    """pytorch-fid's FID network with random weights, BN calibrated on the photos (one
    train-mode pass with momentum=None), saved as its published file name and converted."""
    import torch

    import pyincept
    from pyincept.metrics.protocols import PROTOCOLS

    torch.manual_seed(seed)
    net = fid_network(init_weights=True)
    x = np.stack([PROTOCOLS["pytorch-fid"](p) for p in sorted((folder / "a").glob("*.jpg"))[:16]])
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.reset_running_stats()
                bn.momentum = None
        net.train()
        net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    net.eval()
    pth = folder / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), pth)
    pyincept.convert_checkpoint(pth, folder / "fid.npz")


# --- the workers: one measurement each, in a fresh process -----------------------------------------


def worker(engine, folder, threads):
    import torch  # every engine's process pays torch's import alike: pytorch-fid and torch-fidelity need it

    torch.set_num_threads(threads)
    a, b = str(folder / "a"), str(folder / "b")
    half = len(os.listdir(a))

    if engine.startswith("pyincept"):
        import warnings

        import pyincept

        warnings.simplefilter("ignore")                       # the few-images warning, on purpose here
        pyincept.set_num_threads(threads)
        options = (dict(fid=True, protocol="pytorch-fid") if engine == "pyincept-fid" else
                   dict(fid=True, kid=True, isc=True, protocol="torch-fidelity", kid_subset_size=max(2, half // 2)))

        def call():
            scores = pyincept.calculate_metrics(a, b, weights=str(folder / "fid.npz"), **options)
            return {k: v for k, v in scores.items() if not k.startswith("input")}
    elif engine == "pytorch-fid":
        import pytorch_fid.fid_score as fs
        import pytorch_fid.inception as pi

        net = torch.load(folder / "pt_inception-2015-12-05-6726825d.pth", weights_only=True)
        # its network, with these weights where it would download the published ones
        pi.fid_inception_v3 = lambda: fid_network(net)
        workers = min(len(os.sched_getaffinity(0)), 8)

        def call():
            return {"frechet_inception_distance": fs.calculate_fid_given_paths([a, b], 50, "cpu", 2048, workers)}
    else:
        import torch_fidelity

        def call():
            return torch_fidelity.calculate_metrics(
                input1=a, input2=b, cuda=False, fid=True, kid=True, isc=True, kid_subset_size=max(2, half // 2), verbose=False,
                cache=False, feature_extractor_weights_path=str(folder / "pt_inception-2015-12-05-6726825d.pth"))

    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        scores = call()
        seconds.append(time.perf_counter() - t0)
    print(PREFIX + json.dumps({"engine": engine, "seconds": seconds, "images": 2 * half, "scores": scores,
                               "blas": _blas()}), flush=True)


def fid_network(state=None, init_weights=False):
    """What pytorch_fid.inception.fid_inception_v3() builds, with `state` for its download."""
    import pytorch_fid.inception as pi

    net = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=init_weights)
    for name, block in [("Mixed_5b", pi.FIDInceptionA(192, 32)), ("Mixed_5c", pi.FIDInceptionA(256, 64)),
                        ("Mixed_5d", pi.FIDInceptionA(288, 64)), ("Mixed_6b", pi.FIDInceptionC(768, 128)),
                        ("Mixed_6c", pi.FIDInceptionC(768, 160)), ("Mixed_6d", pi.FIDInceptionC(768, 160)),
                        ("Mixed_6e", pi.FIDInceptionC(768, 192)), ("Mixed_7b", pi.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pi.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    if state is not None:
        net.load_state_dict(state)
    return net


def fid_worker(threads, repeats=3):
    """One FID of two 2048-d statistics (10000 random features each, with a decaying spectrum
    like Inception's), by pyincept and by pytorch-fid's `calculate_frechet_distance` (scipy sqrtm)."""
    import pytorch_fid.fid_score as fs

    from pyincept.metrics import FeatureStats, frechet_distance

    rng = np.random.default_rng(0)
    basis = rng.standard_normal((2048, 2048)) / np.sqrt(np.arange(1, 2049))[:, None]
    stats = [FeatureStats.from_features(np.abs(rng.standard_normal((10000, 2048)) @ basis) + shift) for shift in (0, 0.1)]
    (m1, s1), (m2, s2) = [(s.mu, s.sigma) for s in stats]
    out = {"blas": _blas()}
    for name, fn in (("pyincept", frechet_distance), ("pytorch-fid (scipy sqrtm)", fs.calculate_frechet_distance)):
        times, value = [], None
        for _ in range(repeats if name == "pyincept" else 1):
            t0 = time.perf_counter()
            value = fn(m1, s1, m2, s2)
            times.append(time.perf_counter() - t0)
        out[name] = {"seconds": min(times), "fid": float(value)}
    print(PREFIX + json.dumps(out), flush=True)


def _blas():
    from threadpoolctl import threadpool_info

    return sorted({f"{lib.get('internal_api')} {lib.get('architecture')}" for lib in threadpool_info()
                   if lib["user_api"] == "blas"})


# --- the run and the report ----------------------------------------------------------------------


def run(args):
    from benchmarks import report

    own = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pyincept-metrics-"))
    if not (own / "fid.npz").exists():
        print(f"[metrics] photos and network in {own}", file=sys.stderr)
        make_photos(own, args.images, args.size)
        make_network(own)
    env = dict(os.environ)
    n = str(args.threads)
    env.update({"PYINCEPT_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n})
    forced = {k: env[k] for k in UNSET if k in env}
    if not args.openblas_as_set:
        for k in UNSET:
            env.pop(k, None)
    results, errors = {e: [] for e in ENGINES}, []

    def sub(*cmd):
        p = subprocess.run([sys.executable, "-m", "benchmarks.metrics", *cmd], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=3600)
        lines = [l for l in p.stdout.splitlines() if l.startswith(PREFIX)]
        if p.returncode or not lines:
            errors.append(f"{' '.join(cmd[:2])}: exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}")
            return None
        return json.loads(lines[-1][len(PREFIX):])

    for r in range(args.rounds):
        for engine in ENGINES[r % len(ENGINES):] + ENGINES[: r % len(ENGINES)]:
            print(f"[metrics] round {r + 1}: {engine}", file=sys.stderr, flush=True)
            out = sub("--worker", engine, str(own), "--threads", n)
            if out:
                results[engine].append(out)
    print("[metrics] FID of two 2048-d statistics", file=sys.stderr, flush=True)
    fid = sub("--fid-worker", "--threads", n)

    m, v = report.machine(), report.versions()
    best = {e: max(o["images"] / o["seconds"][1] for o in results[e]) if results[e] else None for e in ENGINES}
    lines = [
        "# Metrics: pyincept against pytorch-fid and torch-fidelity",
        "",
        f"`python -m benchmarks.metrics {' '.join(args.argv)}`".replace(" `", "`"),
        f"on {datetime.date.today()}: {m['cpu']}, {m['usable_cpus']} usable CPUs, {args.threads} threads for every engine, "
        f"{args.images} photos of {args.size}x{args.size} (JPEG) in two folders, {args.rounds} round(s).",
        f"OpenBLAS variables: {'as set (' + ', '.join(f'{k}={v}' for k, v in forced.items()) + ')' if args.openblas_as_set else 'unset in every engine process' + (f' (this shell sets {forced})' if forced else '')}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in v.items() if v)}.",
        "",
        "## Images/s from files to scores (best round; higher is better)",
        "",
        "| engine | scores | img/s per round | best | vs its tool | BLAS kernel |",
        "|---|---|---|---|---|---|",
    ]
    tool_of = {"pyincept-fid": "pytorch-fid", "pyincept-all": "torch-fidelity"}
    what = {"pyincept-fid": "FID (pytorch-fid protocol)", "pytorch-fid": "FID", "pyincept-all": "FID, KID, IS (torch-fidelity protocol)",
            "torch-fidelity": "FID, KID, IS"}
    for e in ENGINES:
        rates = [o["images"] / o["seconds"][1] for o in results[e]]
        ratio = f"{best[e] / best[tool_of[e]]:.2f}x" if e in tool_of and best[e] and best[tool_of[e]] else ""
        blas = ", ".join(results[e][0]["blas"]) if results[e] else ""
        lines.append(f"| {e} | {what[e]} | {', '.join(f'{x:.1f}' for x in rates)} | {best[e] or 0:.1f} | {ratio} | {blas} |")
    lines += ["", "Target (issue 15): at least 2x both tools.", "", "The scores each engine gave (second call):", ""]
    for e in ENGINES:
        if results[e]:
            lines.append(f"- {e}: " + ", ".join(f"{k} {val:.6g}" for k, val in results[e][-1]["scores"].items()))
    if fid:
        lines += ["", "## One FID of two 2048-d statistics (10000 features each)", "",
                  "| method | seconds | FID |", "|---|---|---|"]
        for name in ("pyincept", "pytorch-fid (scipy sqrtm)"):
            lines.append(f"| {name} | {fid[name]['seconds']:.3f} | {fid[name]['fid']:.6f} |")
        lines += ["", f"BLAS: {', '.join(fid['blas'])}. Target (issue 15): under 1 s."]
    return report.finish(lines, errors, args.out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=260, help="photos in all, half in each folder (default 260)")
    parser.add_argument("--size", type=int, default=200, help="their side in pixels (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, engine order rotated (default 2)")
    parser.add_argument("--openblas-as-set", action="store_true", help="keep OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE")
    parser.add_argument("--workdir", help="keep the photos and weights here (reused when present)")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--fid-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.worker:
        return worker(args.worker[0], Path(args.worker[1]), args.threads)
    if args.fid_worker:
        return fid_worker(args.threads)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
