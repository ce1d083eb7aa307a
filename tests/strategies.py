"""Hypothesis strategies: only valid geometries, drawn from one place.

Every strategy returns plain Python values; tests build the arrays from a seed so a
failing example prints small and replays exactly.
"""

from hypothesis import strategies as st

from pyincept.kernels.geometry import conv_output_size, pool_output_size

# v3's kernel shapes first, so Hypothesis tries them early, then anything small.
V3_KERNELS = [(1, 1), (3, 3), (5, 5), (1, 7), (7, 1), (1, 3), (3, 1)]


@st.composite
def conv_geometry(draw):
    """(N, H, W, C, K, (R, S), (sh, sw), (top, bottom, left, right)) with a non-empty output."""
    R, S = draw(st.sampled_from(V3_KERNELS) | st.tuples(st.integers(1, 5), st.integers(1, 5)))
    stride = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    pads = draw(st.tuples(*[st.integers(0, 3)] * 4))
    H = draw(st.integers(max(1, R - pads[0] - pads[1]), 13))
    W = draw(st.integers(max(1, S - pads[2] - pads[3]), 13))
    N = draw(st.integers(1, 3))
    C = draw(st.integers(1, 9))
    K = draw(st.integers(1, 9))
    assert conv_output_size(H, R, stride[0], pads[0], pads[1]) >= 1
    assert conv_output_size(W, S, stride[1], pads[2], pads[3]) >= 1
    return N, H, W, C, K, (R, S), stride, pads


@st.composite
def pool_geometry(draw):
    """(N, H, W, C, (R, S), (sh, sw), (ph, pw), ceil_mode, count_include_pad), valid for torch:
    padding at most half the kernel, and at least one output."""
    R, S = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    pad = (draw(st.integers(0, R // 2)), draw(st.integers(0, S // 2)))
    ceil_mode = draw(st.booleans())
    H = draw(st.integers(max(1, R - 2 * pad[0]), 12))
    W = draw(st.integers(max(1, S - 2 * pad[1]), 12))
    assert pool_output_size(H, R, stride[0], pad[0], ceil_mode) >= 1
    assert pool_output_size(W, S, stride[1], pad[1], ceil_mode) >= 1
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    return N, H, W, C, (R, S), stride, pad, ceil_mode, draw(st.booleans())


seeds = st.integers(0, 2**32 - 1)


def _tile_edges():
    """Every size where a SIMD path's blocking changes: its MR and NR tile, its KC depth block
    and MC row block, one below and one above each."""
    from pyincept.kernels.gemm import SIMD_PATHS, blocking

    edges = set()
    for path in SIMD_PATHS.values():
        KC, MC = blocking(path)
        for size in (path.rows, path.nr, path.lanes, KC, MC):
            edges.update((size - 1, size, size + 1))
    return sorted(e for e in edges if e >= 1)


TILE_EDGES = _tile_edges()
PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 37, 61, 97, 127]


def gemm_size(most):
    """A GEMM dimension: 1, a prime, a tile edge, or anything up to `most`."""
    edges = [e for e in TILE_EDGES if e <= most]
    return st.sampled_from([1, *PRIMES[:6], *edges]) | st.integers(1, most)


@st.composite
def gemm_shape(draw):
    """(M, D, K) for C = A @ B, (M, D) @ (D, K): small enough for reference.gemm's NumPy loop,
    large enough to cross every block (MC rows, KC depth) of every path (AVX-512's MC is 504)."""
    return draw(gemm_size(520)), draw(gemm_size(600)), draw(gemm_size(80))
