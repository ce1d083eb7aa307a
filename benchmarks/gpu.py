"""pyincept's CUDA target against torch on the same GPU: `python -m benchmarks.gpu [--out FILE]`.

The CPU suite (`python -m benchmarks`) never touches a GPU; this is its small twin for
machines with one. Same random weights for both engines (`engines.prepare`), inputs
already on the device, medians over repeated runs after warm-up. Every timed call ends
with the logits back on the host, so both engines pay for their own synchronisation.
Reports batch-1 latency and batch-8/32 throughput, and the largest logit difference of
each engine from pyincept on the CPU. Prints Markdown; torch missing or without CUDA
just drops its column.
"""

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks import engines
from benchmarks.worker import images

BATCHES = (1, 8, 32)


def median_seconds(fn, repeats, warmups=3):
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pyincept_engine(workdir):
    import pyincept

    model = pyincept.inception_v3(f"{workdir}/{engines.PYINCEPT_WEIGHTS}", device="cuda")
    kernels = pyincept.kernels.backend("cuda")
    return lambda x: model(x), kernels.to_device


def torch_engine(workdir):
    import torch

    if not torch.cuda.is_available():
        return None
    model = engines.torchvision_model(torch.load(f"{workdir}/{engines.TORCH_WEIGHTS}", weights_only=True)).cuda()
    torch.backends.cudnn.benchmark = True

    def forward(x):
        with torch.inference_mode():
            return model(x).cpu().numpy()

    return forward, lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().cuda()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)

    import pyincept

    try:
        pyincept.kernels.backend("cuda")
    except pyincept.PyinceptError as error:
        print(f"benchmarks.gpu: {error}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="pyincept-gpu-bench-")
    engines.prepare(workdir, seed=0)
    x_check = images(2, seed=7)
    reference = pyincept.inception_v3(f"{workdir}/{engines.PYINCEPT_WEIGHTS}")(x_check)
    scale = float(np.abs(reference).max())

    built = {"pyincept (cuda)": pyincept_engine(workdir)}
    if engines.missing("torch") is None:
        engine = torch_engine(workdir)
        if engine is not None:
            built["torch eager (cuda)"] = engine
    rows = []
    for name, (forward, up) in built.items():
        error = float(np.abs(forward(up(x_check)) - reference).max()) / scale
        cells = [name]
        for batch in BATCHES:
            x = up(images(batch))
            seconds = median_seconds(lambda: forward(x), args.repeats)
            cells.append(f"{seconds * 1e3:.2f} ms" if batch == 1 else f"{batch / seconds:.0f} img/s")
        cells.append(f"{error:.1e}")
        rows.append(cells)

    lines = ["| engine | batch 1 latency | batch 8 | batch 32 | max abs logit diff vs CPU (relative) |",
             "|---|---|---|---|---|", *("| " + " | ".join(r) + " |" for r in rows)]
    import numba
    from numba import cuda

    gpu = cuda.get_current_device().name
    gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    text = "\n".join([f"GPU: {gpu}; numba {numba.__version__}; medians of {args.repeats} runs after 3 warm-ups; "
                      f"command: python -m benchmarks.gpu", "", *lines, ""])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
