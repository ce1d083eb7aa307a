"""pyincept's matrix product against its readable twin, bit for bit (kernels/gemm.py).

The rule: every output is one FMA chain over the depth, in order. `reference.gemm` states
it in NumPy (its FMA is checked against the C library's fmaf); the fast GEMM must equal
it with np.array_equal on every SIMD path this CPU runs, for every shape, every split of
its rows and panels (how threads share a product), and every row stride of its output.
"""

import ctypes
import ctypes.util
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyincept.errors import PyinceptError
from pyincept.kernels import gemm as G
from pyincept.kernels import reference
from strategies import gemm_shape, seeds

PATHS = [G.SIMD_PATHS[name] for name in G.runnable_paths()]
SETTINGS = settings(max_examples=40, deadline=None)


def operands(M, D, K, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, D)).astype(np.float32), rng.standard_normal((D, K)).astype(np.float32)


def libm_fmaf():
    name = ctypes.util.find_library("m")
    fmaf = getattr(ctypes.CDLL(name), "fmaf", None) if name else None
    if fmaf is None:
        pytest.skip("no C library fmaf to compare with")
    fmaf.restype, fmaf.argtypes = ctypes.c_float, [ctypes.c_float] * 3
    return fmaf


# A product and a sum whose exact value lies just above a float32 halfway point, while its
# float64 rounding lands on the halfway point itself: a*b = 2^-24 + 2^-60 and c = 1, so the
# exact sum 1 + 2^-24 + 2^-60 rounds up to 1 + 2^-23; through float64 (or a separate multiply
# and add) it ties to even, 1.
HALFWAY = (np.float32(1 + 2.0**-12), np.float32(2.0**-24 * (1 - 2.0**-12 + 2.0**-24)), np.float32(1))


def test_reference_fma_is_the_c_librarys_fmaf():
    fmaf = libm_fmaf()
    rng = np.random.default_rng(0)
    n = 20_000
    a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    c = (-(a.astype(np.float64) * b) * (1 + 1e-7 * rng.standard_normal(n))).astype(np.float32)   # cancellation
    c[::3] = rng.standard_normal(n)[::3]
    a[::7] *= np.float32(2.0**-30)                                                                # wide exponent gaps
    want = np.array([fmaf(float(x), float(y), float(z)) for x, y, z in zip(a, b, c)], np.float32)
    assert np.array_equal(reference.fma(a, b, c), want)


def test_reference_fma_rounds_once_where_double_rounding_would_not():
    fmaf = libm_fmaf()
    a, b, c = HALFWAY
    assert float(a) * float(b) == 2.0**-24 + 2.0**-60                      # exact in float64
    assert np.float32(float(a) * float(b) + float(c)) == 1                 # float64 then float32: wrong
    assert reference.fma(a, b, c) == np.float32(1 + 2.0**-23) == fmaf(float(a), float(b), float(c))


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_each_step_is_a_fused_multiply_add(path):
    """A = [1, a], B = [1, b]: the chain is fma(a, b, 1) after 1*1, which only a fused
    multiply-add rounds up (HALFWAY)."""
    a, b, c = HALFWAY
    got = G.gemm(np.array([[c, a]], np.float32), G.pack_weights(np.array([[1], [b]], np.float32), path))
    assert got[0, 0] == np.float32(1 + 2.0**-23)


@SETTINGS
@given(gemm_shape(), seeds)
def test_gemm_is_the_reference_chain_bit_for_bit_on_every_path(shape, seed):
    a, b = operands(*shape, seed)
    want = reference.gemm(a, b)
    for path in PATHS:
        got = G.gemm(a, G.pack_weights(b, path))
        assert np.array_equal(got, want), f"{path.name}: {np.abs(got - want).max()}"


@SETTINGS
@given(gemm_shape(), seeds, st.booleans())
def test_the_bias_and_relu_epilogue_follows_the_chain(shape, seed, relu):
    a, b = operands(*shape, seed)
    bias = np.random.default_rng(seed + 1).standard_normal(shape[2]).astype(np.float32)
    chain = reference.gemm(a, b) + bias
    want = np.maximum(chain, 0) if relu else chain
    for path in PATHS:
        assert np.array_equal(G.gemm(a, G.pack_weights(b, path), bias, relu), want)


@SETTINGS
@given(gemm_shape(), seeds, st.data())
def test_any_split_of_rows_and_panels_and_any_output_window_gives_the_same_bits(shape, seed, data):
    """How threads share a product (rows, or panels of columns) and where it is written
    (a channel window of a wider output) never change an output's bits."""
    M, D, K = shape
    a, b = operands(M, D, K, seed)
    want = reference.gemm(a, b)
    for path in PATHS:
        panels = G.pack_weights(b, path)
        P = panels.data.shape[0]
        i_cut = data.draw(st.integers(0, M), label="row cut")
        j_cut = data.draw(st.integers(0, P), label="panel cut")
        left = data.draw(st.integers(0, 5), label="channels before")
        wide = np.full((M, left + K + 3), np.nan, np.float32)                  # a window in a wider buffer
        c = wide[:, left : left + K]
        for i0, i1 in ((0, i_cut), (i_cut, M)):
            for j0, j1 in ((0, j_cut), (j_cut, P)):
                G.gemm_into(a, panels, c, i0, i1, j0, j1)
        assert np.array_equal(c, want), path.name
        assert np.isnan(wide[:, :left]).all() and np.isnan(wide[:, left + K :]).all()   # nothing outside it


def test_a_strided_a_is_read_in_place():
    """A may be a view with any row stride (a 1x1 conv's input, a Winograd point's rows)."""
    a, b = operands(40, 70, 20, 3)
    wide = np.zeros((40, 90), np.float32)
    wide[:, 10:80] = a
    for path in PATHS:
        c = np.empty((40, 20), np.float32)
        G.gemm_into(wide[:, 10:80], G.pack_weights(b, path), c)
        assert np.array_equal(c, reference.gemm(a, b))


def test_nan_and_inf_propagate_through_the_chain_and_relu():
    a, b = operands(7, 9, 18, 4)
    a[2, 3] = np.nan
    a[4, 0] = np.inf
    b[0, 5] = 0.0                                                               # inf * 0: NaN
    want = np.maximum(reference.gemm(a, b), 0)
    want[np.isnan(reference.gemm(a, b))] = np.nan                               # ReLU keeps a NaN
    assert np.isnan(want[2]).all() and np.isnan(want[4, 5]) and np.isinf(want[4]).any()
    for path in PATHS:
        got = G.gemm(a, G.pack_weights(b, path), np.zeros(18, np.float32), relu=True)
        assert np.array_equal(got, want, equal_nan=True), path.name


def test_an_empty_depth_is_zero_and_shapes_must_chain():
    assert np.array_equal(G.gemm(np.zeros((3, 0), np.float32), np.zeros((0, 5), np.float32), np.ones(5)), np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"do not chain"):
        G.gemm(np.zeros((3, 4), np.float32), np.zeros((5, 2), np.float32))



def test_read_only_operands_are_read_and_a_relu_needs_its_bias():
    """A memory-mapped weight file or a frozen array is read as it is, with no copy."""
    a, b = operands(37, 50, 21, 5)
    bias = np.random.default_rng(6).standard_normal(21).astype(np.float32)
    want = np.maximum(reference.gemm(a, b) + bias, 0)
    for path in PATHS:
        panels = G.pack_weights(b, path)
        epilogue = G.padded_bias(bias, 21, path)
        for array in (a, panels.data, epilogue):
            array.setflags(write=False)
        c = np.empty((37, 21), np.float32)
        G.gemm_into(a, panels, c, bias=epilogue, relu=True)
        assert np.array_equal(c, want), path.name
        a.setflags(write=True)
    with pytest.raises(ValueError, match=r"ReLU epilogue comes after a bias"):
        G.gemm_into(a, G.pack_weights(b), np.empty((37, 21), np.float32), relu=True)

def test_panels_hold_the_weights_and_unpack_to_them():
    rng = np.random.default_rng(5)
    for shape in [(37, 21), (3, 3, 8, 40), (6, 11, 17)]:
        w = rng.standard_normal(shape).astype(np.float32)
        for path in PATHS:
            panels = G.pack_weights(w, path)
            assert panels.shape == shape and np.array_equal(panels.unpack(), w)
            assert panels.data.shape[-1] == path.nr and panels.data.shape[-3] == -(-shape[-1] // path.nr)
            assert G.pack_weights(panels) is panels
    blocks = [rng.standard_normal((1, 1, 30, k)).astype(np.float32) for k in (5, 17, 16, 3)]   # a fused 1x1's members
    for path in PATHS:
        joined = G.pack_weights(blocks, path)
        assert joined.shape == (1, 1, 30, 41)
        assert np.array_equal(joined.data, G.pack_weights(np.concatenate(blocks, axis=3), path).data)


# --- choosing the path ------------------------------------------------------------------


def test_an_unknown_or_unrunnable_path_is_refused_in_one_line():
    with pytest.raises(PyinceptError, match=r"^PYINCEPT_SIMD='sse9' is not a SIMD path: use one of auto, avx512, avx2, generic$"):
        G.resolve_simd("sse9")
    with pytest.raises(PyinceptError, match=r"^PYINCEPT_SIMD=avx512: this CPU lacks avx512f; it can run avx2, generic$"):
        G.resolve_simd("avx512", {"avx2", "fma"})
    assert G.resolve_simd("auto", {"avx2", "fma"}).name == "avx2"
    assert G.resolve_simd(" AVX2 ", {"avx2", "fma", "avx512f"}).name == "avx2"
    assert G.resolve_simd("auto", {"avx512f", "avx2", "fma"}).name == "avx512"
    assert G.resolve_simd(None, set()).name == "generic"
    assert G.resolve_simd("auto").name == G.runnable_paths()[0]


def test_the_command_line_refuses_a_path_this_cpu_cannot_run_in_one_line():
    """No traceback, no illegal instruction: one line and exit 1."""
    import os

    unrunnable = [name for name in G.SIMD_PATHS if name not in G.runnable_paths()]
    env = dict(os.environ, PYINCEPT_SIMD=unrunnable[0] if unrunnable else "sse9")
    result = subprocess.run([sys.executable, "-m", "pyincept", "classify", "tests/data", "--top", "1"],
                            capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "PYINCEPT_SIMD" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_micro_kernel_measures_the_cores_peak():
    for path in PATHS:
        assert G.peak_gfma(0.05, path) > 0.5            # a rate, in GFMA/s; its size belongs to the benchmarks


def test_no_kernel_but_the_gemm_fuses_a_multiply_and_an_add():
    """Outside the matrix product every sum is the expression as written: LLVM may not contract
    a multiply and an add into an FMA (no fastmath), or the Winograd transforms, pools and
    epilogues would round otherwise on a CPU with FMA than on one without. Checked in the
    machine code of each kernel, compiled afresh (x86-64: vfmadd/vfmsub/vfnmadd)."""
    import os
    import platform
    import tempfile

    if platform.machine().lower() not in ("x86_64", "amd64") or "fma" not in G.host_features():
        pytest.skip("the check reads x86-64 FMA instructions")
    code = (
        "import numpy as np, pyincept\n"
        "from pyincept.kernels import conv, dense, pool, winograd\n"
        "for name in ('inception_v3', 'googlenet'):\n"
        "    pyincept.create_model(name)(np.zeros((1, 80, 80, 3), np.float32))\n"
        "kernels = {f'{m.__name__}.{k}': f for m in (conv, dense, pool, winograd) for k, f in vars(m).items()\n"
        "           if hasattr(f, 'inspect_asm') and f.signatures}\n"
        "fused = sorted(k for k, f in kernels.items() for s in f.signatures\n"
        "               if any(op in f.inspect_asm(s) for op in ('vfmadd', 'vfmsub', 'vfnmadd', 'vfnmsub')))\n"
        "from numba import njit\n"
        "@njit(fastmath=True)\n"                                   # the control: contraction allowed
        "def control(a, b, c):\n"
        "    for i in range(a.size):\n"
        "        c[i] = a[i] * b[i] + c[i]\n"
        "x = np.ones(64, np.float32); control(x, x, x)\n"
        "assert 'vfmadd' in control.inspect_asm(control.signatures[0]), 'the check cannot see an FMA'\n"
        "print(len(kernels), fused)\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    count, fused = result.stdout.split(" ", 1)
    assert int(count) >= 12, result.stdout                      # transforms, pools, unfold, epilogues ...
    assert fused.strip() == "[]", f"kernels with a fused multiply-add: {fused}"
