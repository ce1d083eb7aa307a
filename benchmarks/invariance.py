"""Could several images share one matrix product, bit for bit, under this OpenBLAS kernel?

    python -m benchmarks.invariance [--model inception_v3]
    OPENBLAS_CORETYPE=SkylakeX python -m benchmarks.invariance    # another kernel (fresh process)

pyincept multiplies one image's rows at a time (`kernels/conv.py:_gemm_pieces`), so that an
image's output never depends on its batch-mates (README, "Determinism"). The price is that
OpenBLAS packs the weights once per image. Images could share a product only if an image's
rows came out with the same bits inside a taller one. This probes that for the kernel
OpenBLAS loaded (threadpoolctl names it), one BLAS thread, float32, as the convolutions call it:

- rows: the smallest m (up to `--limit`) such that an image of m, 2m or 3m rows, stacked under
  another image, keeps its bits at every depth probed; none if no m does;
- columns: whether images side by side (the other operand's layout) ever keep them;
- the cost: one batch-1 pass of the model with its matrix products recorded as called, and the
  multiply-adds they would take with each product's rows padded up to a multiple of m.

Measured on Zen 3 (issue 17, benchmarks/NOTES.md): Haswell's m is 12, at 1.11x the
multiply-adds of Inception v3; columns never kept their bits.
"""

import argparse
import os
import sys

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

DEPTHS = (64, 288, 768, 2048)      # K of the products: v3's 1x1s, im2col 3x3s, 1x7s, Mixed_7's
COLS = 192                         # N: output channels


def _pair(rows, depth, seed):
    rng = np.random.default_rng(seed)
    first, second = (rng.standard_normal((rows, depth), dtype=np.float32) for _ in range(2))
    return first, second, rng.standard_normal((depth, COLS), dtype=np.float32)


def rows_keep_bits(rows, depth, seed=0):
    """Does an image of `rows` rows keep its bits, (rows, depth) @ (depth, COLS), under another?"""
    first, second, w = _pair(rows, depth, seed)
    return np.array_equal(second @ w, (np.vstack([first, second]) @ w)[rows:])


def columns_keep_bits(cols, depth, seed=0):
    """Does an image of `cols` columns keep its bits, (COLS, depth) @ (depth, cols), beside another?"""
    first, second, w = _pair(cols, depth, seed)
    wt, a, b = np.ascontiguousarray(w.T), np.ascontiguousarray(first.T), np.ascontiguousarray(second.T)
    return np.array_equal(wt @ b, (wt @ np.hstack([a, b]))[:, cols:])


def row_multiple(limit=48, depths=DEPTHS):
    """The smallest m <= limit whose multiples m, 2m, 3m keep an image's rows' bits, or None."""
    for m in range(1, limit + 1):
        if all(rows_keep_bits(k * m, d) for k in (1, 2, 3) for d in depths):
            return m
    return None


def recorded_products(model, size):
    """(count, rows, depth, cols) of every float32 product numpy's matmul makes in one
    batch-1 pass of `model` (count > 1 for a stack of products, as Winograd's points)."""
    x = np.random.default_rng(0).random((1, size, size, 3), dtype=np.float32)
    model(x)                                                     # compiled, buffers made
    real, calls = np.matmul, []

    def recording(a, b, *args, **kwargs):
        if a.dtype == np.float32 and a.ndim >= 2 and b.ndim >= 2:
            calls.append((int(np.prod(a.shape[:-2])), a.shape[-2], a.shape[-1], b.shape[-1]))
        return real(a, b, *args, **kwargs)

    np.matmul = recording
    try:
        model(x)
    finally:
        np.matmul = real
    return calls


def padded_cost(calls, m):
    """Multiply-adds with each product's rows padded up to a multiple of m, over the actual."""
    actual = sum(n * r * d * c for n, r, d, c in calls)
    return sum(n * -(-r // m) * m * d * c for n, r, d, c in calls) / actual


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.invariance", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="inception_v3")
    p.add_argument("--limit", type=int, default=48, help="largest row multiple probed (default 48)")
    args = p.parse_args(argv)
    with threadpool_limits(1, user_api="blas"):
        kernel = [lib.get("architecture") for lib in threadpool_info() if lib["user_api"] == "blas"]
        print(f"OpenBLAS kernel: {', '.join(map(str, kernel))} "
              f"(OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})")
        m = row_multiple(args.limit)
        print(f"rows: an image keeps its bits under another at multiples of {m} rows" if m else
              f"rows: no multiple up to {args.limit} keeps an image's bits under another")
        sides = [columns_keep_bits(c, d) for c in (16, 48, 96, 289) for d in DEPTHS]
        print(f"columns: {sum(sides)} of {len(sides)} probes kept an image's bits beside another")
        if m:
            import pyincept
            from pyincept.models.registry import get_spec

            pyincept.set_num_threads(1)
            calls = recorded_products(pyincept.create_model(args.model), get_spec(args.model).input_size[0])
            print(f"{args.model}: {len(calls)} products per image; their rows padded to multiples of {m}: "
                  f"{padded_cost(calls, m):.3f}x the multiply-adds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
