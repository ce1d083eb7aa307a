"""pyincept on Ray against one process, on the same machine and cores: what Ray costs.

    python -m benchmarks.distributed [--images 500] [--threads 2] [--out FILE]

`pyincept classify DIR --json` on photographs (the test photos, cropped at random, 256x256
JPEG) with random Inception v3 weights, each run a fresh process with the OpenBLAS variables
unset, in three ways:

    one process          pyincept classify DIR --json
    ray local            ... --ray local: starts a Ray instance, runs, stops it (all timed)
    running cluster      ... --ray auto, a `ray start --head` already up (its start not timed)

each at the full image count and at half of it: the difference of the two is the steady
rate (images/s once everything has started), the rest is the fixed cost (imports, cluster
and actors starting, the model loading). Every Ray run is checked to print exactly what the
one-process run printed.
"""

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted((ROOT / "tests" / "data").glob("*.jpg"))
UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
RAY = str(Path(sys.executable).parent / "ray")          # the ray command of this environment


def make_photos(folder, n, size=256, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.4, 0.9))
        left, top = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        im.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.jpg")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process and of each Ray actor (default 2)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)

    import pyincept
    from benchmarks import report

    work = Path(tempfile.mkdtemp(prefix="pyincept-ray-"))
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update({"PYINCEPT_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)})
    try:
        full, half = work / "full", work / "half"
        make_photos(full, args.images)
        half.mkdir()
        for p in sorted(full.iterdir())[: args.images // 2]:
            shutil.copy(p, half / p.name)
        weights = work / "v3.npz"
        model = pyincept.create_model("inception_v3")
        pyincept.save_weights(weights, model.random_parameters(), {"model": "inception_v3"})

        def classify(folder, *extra):
            cmd = [sys.executable, "-m", "pyincept", "classify", str(folder), "--weights", str(weights), "--json",
                   "--quiet", *map(str, extra)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"{' '.join(cmd[3:])} failed: {p.stderr.strip().splitlines()[-1:]}")
            return seconds, p.stdout

        print("[distributed] warming the Numba cache", file=sys.stderr)
        classify(half)
        port = free_port()
        subprocess.run([RAY, "start", "--head", "--port", str(port),
                        "--num-cpus", str(os.cpu_count()), "--include-dashboard", "false", "--disable-usage-stats"],
                       env=env, capture_output=True, check=True)
        ray_opts = ["--threads-per-worker", args.threads, "--shard-size", args.shard_size]
        ways = {"one process": [], "ray local": ["--ray", "local", *ray_opts],
                "running cluster": ["--ray", "auto", *ray_opts]}             # the one `ray start` left running
        rows = {}
        try:
            reference = {}
            for name, extra in ways.items():
                times = {}
                for label, folder in (("half", half), ("full", full)):
                    print(f"[distributed] {name}, {label}", file=sys.stderr, flush=True)
                    seconds, out = classify(folder, *extra)
                    reference.setdefault(label, out)
                    if out != reference[label]:
                        raise SystemExit(f"{name} printed other answers than one process for {label}")
                    times[label] = seconds
                rows[name] = times
        finally:
            subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n_full, n_half = args.images, args.images // 2
    m = report.machine()
    base = rows["one process"]
    lines = [
        "# Ray against one process",
        "",
        f"`python -m benchmarks.distributed {' '.join(argv)}`".replace(" `", "`"),
        f"on {datetime.date.today()}: {m['cpu']}, {m['usable_cpus']} usable CPUs; {args.threads} threads in the one process "
        f"and in each Ray actor (one actor on this machine), shards of {args.shard_size}; OpenBLAS variables unset. "
        "Every Ray run printed exactly the one-process run's lines.",
        "",
        f"| run | {n_half} images | {n_full} images | img/s at {n_full} | steady img/s | fixed cost | overhead at {n_full} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in rows.items():
        steady = (n_full - n_half) / (t["full"] - t["half"])
        fixed = t["full"] - n_full / steady
        overhead = t["full"] / base["full"] - 1
        lines.append(f"| {name} | {t['half']:.1f} s | {t['full']:.1f} s | {n_full / t['full']:.1f} | {steady:.1f} | "
                     f"{fixed:.1f} s | {overhead:+.0%} |")
    lines += ["", "Target (issue 16): overhead at most 15% at 500 images."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
