"""A first, honest latency measurement: `python -m benchmarks [--quick]`.

Times pyincept's forward pass (median, min, max over repeats after a warm-up) at
batch 1 and, when torch/torchvision are installed, torchvision's eager model on the
same random weights in the same process, and prints a Markdown table with the ratio.
The full suite (onnxruntime, throughput, memory, cold start) is issue 4's work.
"""

import argparse
import statistics
import time

import numpy as np

import pyincept
from pyincept.inception_v3 import random_parameters


def timings(fn, repeats):
    fn()  # warm-up: JIT compile, first-touch allocations
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def torchvision_model(params):
    """torchvision Inception v3 holding the same weights as pyincept (layouts converted back)."""
    import torch
    import torchvision

    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    state = model.state_dict()
    for key, value in params.items():
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    model.load_state_dict(state)
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run for CI, no thresholds")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats

    params = random_parameters(0)
    model = pyincept.Inception3().load_parameters(params)
    x = np.random.default_rng(0).standard_normal((1, 299, 299, 3)).astype(np.float32)
    rows = [("pyincept", timings(lambda: model(x), repeats))]
    try:
        import torch

        tv = torchvision_model(params)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

        def run_torch():
            with torch.no_grad():
                tv(xt)

        rows.append((f"torch {torch.__version__} eager", timings(run_torch, repeats)))
    except ImportError:
        pass

    base = statistics.median(rows[0][1])
    print("| engine | batch-1 median ms | min | max | median / pyincept |")
    print("|---|---|---|---|---|")
    for name, ts in rows:
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {max(ts) * 1e3:.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
