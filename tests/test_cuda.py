"""The CUDA kernels (`pyincept.kernels.cuda`) against the CPU kernels, without a GPU.

Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) runs every GPU thread as a Python
thread, shared and local memory and `syncthreads` included, so the kernels are checked
where CI runs: on machines with no GPU. The variable must be set before numba.cuda is
first imported, and the rest of the suite shares this process, so
`test_cuda_kernels_under_the_simulator` runs this same file again in a subprocess with
the variable set; there, and only there, the `TestUnderSimulator` class is collected.
The simulator is slow (a Python thread per GPU thread): shapes are tiny.

In this process: the one-line error when CUDA is unavailable, every kernel compiled to
PTX (when the CUDA compiler is installed), and on a real GPU both `TestUnderSimulator`
(now on the hardware) and the whole network against the CPU within the core bar:
`pytest tests/test_cuda.py -k "TestUnderSimulator or real_gpu"` is the GPU check.
"""

import importlib.util
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyincept
from pyincept import fusion, layers
from pyincept.models import inception_v3 as v3
from pyincept.kernels import cpu
from strategies import conv_geometry, pool_geometry, seeds

ROOT = Path(__file__).resolve().parent.parent
SIMULATING = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None


def _real_gpu():
    """True where numba-cuda sees a real GPU (never under the simulator, never on CI)."""
    if SIMULATING or not HAVE_NUMBA_CUDA:
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver counts as no GPU
        return False


REAL_GPU = _real_gpu()
SENTINEL = np.float32(7.25)     # fills the channels of an `out` buffer a kernel must not touch


def _lock_the_simulators_shared_arrays():
    """Make numba-cuda's simulated `cuda.shared.array` one array per block, whatever the thread schedule.

    The simulator gives a block's threads the same shared array by looking the call site
    (file, line) up in a dict and, on a miss, storing a new `np.empty` there: a get, then a
    set, with no lock (numba-cuda 0.30, simulator/kernelapi.py, FakeCUDAShared.array). Its
    GPU threads are Python threads, so when the GIL changes hands between that get and set,
    a second thread misses too and stores an array of its own: one thread of the block then
    stages its part of the GEMM's slabs where nobody else reads, the others read np.empty's
    garbage in its place, and conv2d or linear come back wrong. The GIL changes hands there
    rarely at the default 5 ms switch interval (hence a failure once in many runs, in
    whichever GEMM test it hits), about once in 300 launches at 0.1 ms. Here the same
    lookup, with the same key, runs under a lock.
    """
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "_pyincept_locked", False):
        return
    if not isinstance(getattr(shared(0), "_allocations", None), dict):        # not the code this mirrors
        warnings.warn("numba-cuda's simulator changed FakeCUDAShared: its shared arrays are left unlocked "
                      "(see _lock_the_simulators_shared_arrays in tests/test_cuda.py)")
        return
    original, lock = shared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:      # dynamic shared memory (no lookup), or the simulator's own error
            return original(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)       # the simulator's key: the calling line
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        with lock:
            found = self._allocations.get(key)
            if found is None:
                found = self._allocations[key] = np.empty(shape, dtype)
        return found

    array._pyincept_locked = True
    shared.array = array


if SIMULATING and HAVE_NUMBA_CUDA:
    _lock_the_simulators_shared_arrays()


def run_python(script, **env):
    """Run a Python snippet in a fresh interpreter (no simulator unless asked); its stdout and stderr."""
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    environ.update(env)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


# --- in this process -------------------------------------------------------------------------


@pytest.mark.skipif(SIMULATING, reason="already under the simulator: TestUnderSimulator runs here directly")
def test_cuda_kernels_under_the_simulator():
    """Runs TestUnderSimulator in a subprocess with NUMBA_ENABLE_CUDASIM=1; its report is the failure message."""
    if not HAVE_NUMBA_CUDA:
        pytest.skip('numba-cuda is not installed (pip install -e ".[test]")')
    command = [sys.executable, "-m", "pytest", f"{Path(__file__).resolve()}::TestUnderSimulator",
               "-q", "-p", "no:cacheprovider", "--no-header", "-rfE", "--tb=short"]
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"simulator tests failed (pytest exit {result.returncode}):\n"
                    f"{result.stdout[-12000:]}\n{result.stderr[-3000:]}", pytrace=False)


def test_device_cuda_without_a_gpu_is_a_one_line_error():
    """No GPU visible: inception_v3(device="cuda") raises PyinceptError with one line, never crashes."""
    code, out, err = run_python(
        "import pyincept\n"
        "try:\n"
        "    pyincept.inception_v3(device='cuda')\n"
        "except pyincept.PyinceptError as error:\n"
        "    print('PyinceptError:', error)\n",
        CUDA_VISIBLE_DEVICES="",
    )
    assert code == 0, err
    assert out.startswith("PyinceptError: device 'cuda' "), out + err
    assert out.count("\n") == 1, out                       # one line


@pytest.mark.parametrize("numba_cuda", ["missing", "deprecated built-in"])
def test_without_numba_cuda_the_error_says_how_to_install_it(numba_cuda):
    fake = ("sys.modules['numba.cuda'] = None" if numba_cuda == "missing" else
            "sys.modules['numba.cuda'] = types.SimpleNamespace(implementation='Built-in')\n"
            "import numba; numba.cuda = sys.modules['numba.cuda']")
    code, out, err = run_python(
        "import sys, types\n"
        f"{fake}\n"
        "import pyincept.kernels\n"
        "try:\n"
        "    pyincept.kernels.backend('cuda')\n"
        "except pyincept.PyinceptError as error:\n"
        "    print(error)\n",
    )
    assert code == 0, err
    assert out.strip().endswith('pip install "pyincept[cuda]"'), out + err
    assert out.count("\n") == 1, out


def test_only_numbas_low_occupancy_warning_is_silenced():
    """v3's 8x8 layers launch small grids on purpose: that one warning (coloured or not) goes,
    any other performance warning stays."""
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed")
    code, out, err = run_python(
        "import warnings\n"
        "warnings.resetwarnings()\n"                 # whatever PYTHONWARNINGS or -W the suite runs under
        "from numba.core.errors import NumbaPerformanceWarning\n"
        "import pyincept.kernels.cuda\n"
        "warnings.filterwarnings('always', category=NumbaPerformanceWarning, append=True)\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    for text in ['\\x1b[1mGrid size 48 will likely result in GPU under-utilization due to low occupancy.\\x1b[0m',\n"
        "                 'Grid size 2 will likely result in GPU under-utilization due to low occupancy.',\n"
        "                 'np.dot() is faster on contiguous arrays']:\n"
        "        warnings.warn(NumbaPerformanceWarning(text))\n"
        "import re\n"
        "print([re.sub(r'\\x1b\\[[0-9;]*m', '', str(w.message)) for w in seen])\n",   # numba may colour its text
    )
    assert code == 0, err
    assert out.strip() == "['np.dot() is faster on contiguous arrays']", out + err


def test_every_kernel_compiles_for_a_gpu():
    """The simulator runs kernels as Python and never type-checks them; NVVM does, without a GPU."""
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed")
    code, out, err = run_python(
        "from numba import cuda, types as T\n"
        "from numba.cuda.cudadrv import nvvm\n"
        "if not nvvm.is_available():\n"
        "    print('SKIP no NVVM'); raise SystemExit\n"
        "from pyincept.kernels import cuda as K\n"
        "A4, C4 = T.Array(T.float32, 4, 'A'), T.Array(T.float32, 4, 'C')\n"
        "C2, C1, i, b = T.Array(T.float32, 2, 'C'), T.Array(T.float32, 1, 'C'), T.int64, T.boolean\n"
        "signatures = {\n"
        "    '_gemm_bias_act': (C2, C2, C1, b, A4, i),\n"
        "    '_im2col': (A4, i, i, i, i, i, i, i, i, i, C2),\n"
        "    '_bias_act': (A4, C1, b, A4),\n"
        "    '_pool': (A4, i, i, i, i, i, i, b, b, A4),\n"
        "    '_global_avg_pool': (A4, C4),\n"
        "    '_adaptive_avg_pool': (A4, T.Array(T.int64, 2, 'C'), T.Array(T.int64, 2, 'C'), C4),\n"
        "    '_copy_into': (A4, A4, i),\n"
        "    '_relu': (C1, C1),\n"
        "    '_softmax': (C2, C2),\n"
        "}\n"
        "for name, signature in signatures.items():\n"
        "    ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, signature, cc=(7, 5))\n"
        "    assert '.entry' in ptx, name\n"
        "    if name == '_gemm_bias_act':\n"
        "        assert 'bar.sync' in ptx and '.shared' in ptx\n"
        "        assert 'f64' not in ptx, 'float64 crept into the GEMM'\n"
        "print('OK', len(signatures))\n",
    )
    assert code == 0, out + err
    if out.startswith("SKIP"):
        pytest.skip('the CUDA compiler (NVVM) is not installed: pip install "pyincept[cuda]"')
    assert out.startswith("OK"), out + err


def test_channel_slices_of_real_device_arrays():
    """`buf[..., k0:k1]` on numba's real DeviceNDArray (the simulator's arrays are NumPy's): same
    shape, strides and first byte as NumPy's view, with no GPU needed to build the view."""
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed")
    code, out, err = run_python(
        "import numpy as np\n"
        "from pyincept.kernels import cuda as K\n"
        "class Memory:                                  # stands in for a device allocation\n"
        "    def __init__(self, start=0): self.start = start\n"
        "    def view(self, start, stop=None): return Memory(self.start + start)\n"
        "host = np.zeros((2, 5, 6, 256), np.float32)\n"
        "device = K._DeviceArray(host.shape, host.strides, np.float32, gpu_data=Memory())\n"
        "first = lambda v: v.__array_interface__['data'][0] - host.__array_interface__['data'][0]\n"
        "layout = lambda a: (a.shape, tuple(s for s, n in zip(a.strides, a.shape) if n > 1))   # a size-1 axis has no stride\n"
        "for index in [(Ellipsis, slice(64, 128)), (slice(None), Ellipsis, slice(3, 4)), (1, Ellipsis, slice(8, 9))]:\n"
        "    d, h = device[index], host[index]\n"
        "    assert type(d) is K._DeviceArray and not d.is_c_contiguous(), index\n"
        "    assert (layout(d), d.gpu_data.start) == (layout(h), first(h)), index\n"
        "    twice, twice_h = d[:, 1:3], h[:, 1:3]                # a slice of a slice\n"
        "    assert (layout(twice), twice.gpu_data.start) == (layout(twice_h), first(twice_h)), index\n"
        "print('OK')\n",
    )
    assert code == 0 and out.startswith("OK"), out + err


@pytest.mark.slow
@pytest.mark.skipif(SIMULATING, reason="the whole network is far too slow for the simulator")
def test_whole_network_on_a_real_gpu_matches_the_cpu(request):
    """Logits of inception_v3(device="cuda") within the core bar of the CPU's, on real photographs."""
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed")
    try:
        pyincept.kernels.backend("cuda")
    except pyincept.PyinceptError as error:
        pytest.skip(f"no CUDA GPU: {error}")
    from photos import photo_batch

    weights = request.getfixturevalue("converted")["zip"]       # calibrated torchvision weights
    x = photo_batch()
    expected = pyincept.inception_v3(weights)(x)
    model = pyincept.inception_v3(weights, device="cuda")
    assert model.device == "cuda"
    for _ in range(2):                                           # the second pass reuses every buffer
        actual = model(x)
        assert isinstance(actual, np.ndarray) and actual.shape == expected.shape
        assert np.abs(expected).max() > 1e-3
        rel = np.abs(actual - expected).max() / np.abs(expected).max()
        assert rel <= 1e-3, f"max |delta logit| is {rel:.2e} of the largest logit"
        top5 = lambda z: np.argsort(-z, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(top5(actual), top5(expected))
    taps = model.run(x[:1], ["Mixed_5b.branch_pool", "avgpool"])   # a channel-slice tap comes home too
    cpu_taps = pyincept.inception_v3(weights).run(x[:1], ["Mixed_5b.branch_pool", "avgpool"])
    for name in taps:
        np.testing.assert_allclose(taps[name], cpu_taps[name], rtol=1e-3, atol=1e-3 * np.abs(cpu_taps[name]).max())


# --- under the simulator (collected in the subprocess above, or here on a real GPU) -----------


def tiny_conv(geometry):
    """A conv_geometry shrunk for the simulator: N <= 2, H, W <= 7, C, K <= 6, output still non-empty."""
    N, H, W, C, K, (R, S), stride, (top, bottom, left, right) = geometry
    H = max(R - top - bottom, min(H, 6))          # R <= 7, so H <= 7
    W = max(S - left - right, min(W, 6))
    return min(N, 2), H, W, min(C, 6), min(K, 6), (R, S), stride, (top, bottom, left, right)


def tiny_pool(geometry):
    """A pool_geometry shrunk for the simulator; the lower bound keeps at least one output."""
    N, H, W, C, (R, S), stride, (ph, pw), ceil_mode, count_include_pad = geometry
    H = max(R - 2 * ph, min(H, 7))
    W = max(S - 2 * pw, min(W, 7))
    return min(N, 2), H, W, C, (R, S), stride, (ph, pw), ceil_mode, count_include_pad


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(actual, expected, atol=1e-5):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol * scale)


class TestUnderSimulator:
    """Every kernel in kernels.cuda against kernels.cpu, run by Numba's CUDA simulator;
    on a machine with a real GPU, run on the GPU in this process as well."""

    __test__ = SIMULATING or REAL_GPU
    SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)

    @property
    def cuda(self):
        """The kernel set, as Inception3.to("cuda") gets it: the simulator counts as available."""
        return pyincept.kernels.backend("cuda")

    # Inputs and outputs as channel slices of wider device buffers, as an Inception
    # module hands them over: x = wide[..., 2:2+C], out = wide_out[..., 1:1+K].

    def up(self, a, sliced, rng):
        """a on the device: itself, or a channel slice of a wider buffer whose other channels are noise."""
        if not sliced:
            return self.cuda.to_device(a)
        wide = randn(rng, *a.shape[:3], a.shape[3] + 5)
        wide[..., 2 : 2 + a.shape[3]] = a
        return self.cuda.to_device(wide)[..., 2 : 2 + a.shape[3]]

    def out_buffer(self, shape, sliced):
        """(out to pass, function giving the host result and checking the other channels kept SENTINEL)."""
        if not sliced:
            return None, lambda y: self.cuda.to_host(y)
        wide = self.cuda.to_device(np.full((*shape[:3], shape[3] + 3), SENTINEL, np.float32))
        out = wide[..., 1 : 1 + shape[3]]

        def result(y):
            assert y is out
            host = self.cuda.to_host(wide)
            assert (host[..., :1] == SENTINEL).all() and (host[..., 1 + shape[3] :] == SENTINEL).all()
            return host[..., 1 : 1 + shape[3]]

        return out, result

    @SETTINGS
    @given(st.builds(tiny_conv, conv_geometry()), st.booleans(), st.booleans(), st.booleans(), st.booleans(), seeds)
    def test_conv2d(self, geometry, with_bias, relu, x_sliced, out_sliced, seed):
        N, H, W, C, K, (R, S), stride, pads = geometry
        rng = np.random.default_rng(seed)
        x, w = randn(rng, N, H, W, C), randn(rng, R, S, C, K)
        b = randn(rng, K) if with_bias else None
        expected = cpu.conv2d(x, w, b, stride, pads, relu=relu)
        out, result = self.out_buffer(expected.shape, out_sliced)
        y = self.cuda.conv2d(self.up(x, x_sliced, rng), self.cuda.to_device(w), b, stride, pads, relu=relu, out=out)
        close(result(y), expected, atol=1e-5 * np.sqrt(R * S * C))

    @SETTINGS
    @given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5), st.integers(1, 8), st.integers(1, 70),
           st.booleans(), st.booleans(), seeds)
    def test_pointwise_conv2d(self, N, H, W, C, K, x_sliced, out_sliced, seed):
        """1x1 stride 1 goes straight to the GEMM (a slice input through im2col); K up to 70 spans two column tiles."""
        rng = np.random.default_rng(seed)
        x, w, b = randn(rng, N, H, W, C), randn(rng, 1, 1, C, K), randn(rng, K)
        expected = cpu.conv2d(x, w, b, relu=True)
        out, result = self.out_buffer(expected.shape, out_sliced)
        y = self.cuda.conv2d(self.up(x, x_sliced, rng), w, self.cuda.to_device(b), relu=True, out=out)
        close(result(y), expected, atol=1e-5 * np.sqrt(C))

    def test_gemm_spans_several_row_tiles_and_deep_slabs(self):
        """M = 130 rows (three 64-row tiles), D = 75 (three 32-deep slabs, the last one partial)."""
        rng = np.random.default_rng(1)
        x, w, b = randn(rng, 2, 5, 13, 3), randn(rng, 5, 5, 3, 5), randn(rng, 5)
        y = self.cuda.to_host(self.cuda.conv2d(x, w, b, padding=2, relu=True))
        close(y, cpu.conv2d(x, w, b, padding=2, relu=True), atol=1e-5 * np.sqrt(75))

    def test_im2col_in_tiles_of_rows(self, monkeypatch):
        """A scratch too small for the whole unfolding: the conv runs in tiles of output rows."""
        from pyincept import config

        monkeypatch.setattr(config, "CUDA_SCRATCH_FLOATS", 3 * 5 * 9 * 2)   # 3 output rows of 5 pixels
        rng = np.random.default_rng(2)
        x, w = randn(rng, 2, 5, 5, 2), randn(rng, 3, 3, 2, 4)
        y = self.cuda.to_host(self.cuda.conv2d(x, w, padding=1))
        close(y, cpu.conv2d(x, w, padding=1), atol=1e-4)

    @SETTINGS
    @given(st.builds(tiny_pool, pool_geometry()), st.booleans(), st.booleans(), st.booleans(), st.booleans(), seeds)
    def test_pool(self, geometry, is_max, x_sliced, out_sliced, with_nan, seed):
        N, H, W, C, kernel, stride, padding, ceil_mode, count_include_pad = geometry
        rng = np.random.default_rng(seed)
        x = randn(rng, N, H, W, C)
        if with_nan:
            x[0, rng.integers(H), rng.integers(W), rng.integers(C)] = np.nan     # NaN propagates, as in torch
        if is_max:
            expected = cpu.max_pool2d(x, kernel, stride, padding, ceil_mode)
        else:
            expected = cpu.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad)
        out, result = self.out_buffer(expected.shape, out_sliced)
        xd = self.up(x, x_sliced, rng)
        if is_max:
            y = self.cuda.max_pool2d(xd, kernel, stride, padding, ceil_mode, out=out)
        else:
            y = self.cuda.avg_pool2d(xd, kernel, stride, padding, ceil_mode, count_include_pad, out=out)
        np.testing.assert_allclose(result(y), expected, rtol=1e-6, atol=1e-6)   # NaNs must match NaNs

    @settings(max_examples=4, deadline=None, derandomize=True)
    @given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 9), st.booleans(),
           st.booleans(), st.booleans(), seeds)
    def test_bias_act(self, N, H, W, K, relu, x_sliced, out_sliced, seed):
        rng = np.random.default_rng(seed)
        x, b = randn(rng, N, H, W, K), randn(rng, K)
        out, result = self.out_buffer(x.shape, out_sliced)
        y = self.cuda.bias_act(self.up(x, x_sliced, rng), self.cuda.to_device(b), relu=relu, out=out)
        np.testing.assert_array_equal(result(y), cpu.bias_act(x, b, relu=relu))

    def test_global_avg_pool_then_reshape_as_the_model_does(self):
        rng = np.random.default_rng(3)
        x = randn(rng, 2, 3, 5, 7)
        y = self.cuda.global_avg_pool2d(self.up(x, True, rng))
        assert y.shape == (2, 1, 1, 7)
        flat = y.reshape(y.shape[0], -1)                                  # Inception3.run before fc
        np.testing.assert_array_equal(self.cuda.to_host(flat), cpu.global_avg_pool2d(x).reshape(2, -1))

    def test_adaptive_avg_pool_as_googlenets_aux_heads(self):
        rng = np.random.default_rng(5)
        x = randn(rng, 2, 14, 9, 3)                                          # 14 -> 4 overlaps, 9 -> 4 too
        y = self.cuda.adaptive_avg_pool2d(self.up(x, True, rng), (4, 4))
        np.testing.assert_allclose(self.cuda.to_host(y), cpu.adaptive_avg_pool2d(x, (4, 4)), rtol=1e-6, atol=1e-7)

    def test_concat_channels_into_a_slice(self):
        rng = np.random.default_rng(4)
        parts = [randn(rng, 2, 3, 3, k) for k in (1, 4, 2)]
        out, result = self.out_buffer((2, 3, 3, 7), True)
        y = self.cuda.concat_channels([self.up(p, i == 1, rng) for i, p in enumerate(parts)], out=out)
        np.testing.assert_array_equal(result(y), cpu.concat_channels(parts))

    def test_linear_relu_softmax(self):
        rng = np.random.default_rng(5)
        x, w, b = randn(rng, 3, 40), randn(rng, 40, 70), randn(rng, 70)
        close(self.cuda.to_host(self.cuda.linear(self.cuda.to_device(x), self.cuda.to_device(w), self.cuda.to_device(b))),
              cpu.linear(x, w, b), atol=1e-5 * np.sqrt(40))
        close(self.cuda.to_host(self.cuda.linear(x, w)), cpu.linear(x, w), atol=1e-5 * np.sqrt(40))
        z = randn(rng, 2, 3, 2, 5) * 30
        np.testing.assert_array_equal(self.cuda.to_host(self.cuda.relu(self.up(z, True, rng))), cpu.relu(z))
        logits = np.concatenate([randn(rng, 2, 11) * 50, np.full((1, 11), 1e4, np.float32)])   # exp would overflow unshifted
        close(self.cuda.to_host(self.cuda.softmax(self.cuda.to_device(logits))), cpu.softmax(logits), atol=1e-6)

    @pytest.mark.skipif(not SIMULATING, reason="the simulator's shared arrays only")
    def test_one_shared_slab_per_block_when_the_gil_changes_hands_mid_allocation(self, monkeypatch):
        """The race _lock_the_simulators_shared_arrays closes, forced on every launch: np.empty sleeps
        (the GIL goes to the block's other threads) while the simulator creates the GEMM's slabs."""
        import time

        K, empty = self.cuda, np.empty
        slabs = {(K._TILE, K._A_ROW), (K._STEP, K._TILE)}

        def slow_empty(shape, *args, **kwargs):
            if isinstance(shape, tuple) and shape in slabs:
                time.sleep(0.002)
            return empty(shape, *args, **kwargs)

        monkeypatch.setattr(np, "empty", slow_empty)
        rng = np.random.default_rng(8)
        x, w, b = randn(rng, 3, 40), randn(rng, 40, 70), randn(rng, 70)
        close(self.cuda.to_host(self.cuda.linear(x, w, b)), cpu.linear(x, w, b), atol=1e-5 * np.sqrt(40))

    def test_memory_and_argument_checks(self):
        rng = np.random.default_rng(6)
        a = randn(rng, 2, 3, 4, 5)
        d = self.cuda.to_device(a)
        assert self.cuda.to_device(d) is d                               # device arrays pass through
        np.testing.assert_array_equal(self.cuda.to_host(d[..., 1:3]), a[..., 1:3])
        assert self.cuda.empty((1, 2, 3, 4)).shape == (1, 2, 3, 4)
        with pytest.raises(ValueError, match="out must be float32"):
            self.cuda.bias_act(d, np.zeros(5, np.float32), out=self.cuda.empty((2, 3, 4, 4)))
        with pytest.raises(ValueError, match="out must be a device array"):
            self.cuda.bias_act(d, np.zeros(5, np.float32), out=np.empty((2, 3, 4, 5), np.float32))
        with pytest.raises(ValueError, match="weights must be"):
            self.cuda.conv2d(d, np.zeros((3, 3, 4, 2), np.float32))
        with pytest.raises(ValueError, match="pool padding"):
            self.cuda.max_pool2d(d, 3, padding=2)

    def test_ellipsis_indexing_of_real_device_arrays(self):
        """layers.py slices channels as out[..., k0:k1]; numba's DeviceNDArray needs it spelt out."""
        expand = self.cuda._expand_ellipsis
        assert expand((Ellipsis, slice(64, 128)), 4) == (slice(None),) * 3 + (slice(64, 128),)
        assert expand((0, Ellipsis), 4) == (0, slice(None), slice(None), slice(None))
        assert expand(Ellipsis, 2) == (slice(None), slice(None))
        assert expand((slice(1, 2), 3), 4) == (slice(1, 2), 3)
        with pytest.raises(IndexError):
            expand((Ellipsis, 0, Ellipsis), 4)

    @pytest.mark.parametrize("fused", [True, False], ids=["fused-1x1", "torchvision-order"])
    def test_inception_module_end_to_end(self, fused):
        """A whole InceptionA on the device (branches writing into slices of one output) vs the CPU."""
        rng = np.random.default_rng(7)
        block = v3.InceptionA("Mixed_x", 3, pool_features=4)
        params = {}
        for key, shape in block.parameter_shapes().items():
            if key.endswith("conv.weight"):
                params[key] = randn(rng, *shape) * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
            elif key.endswith(("bn.weight", "bn.running_var")):
                params[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            else:
                params[key] = randn(rng, *shape) * np.float32(0.2)
        block.load(params)
        fusion.fuse(block, fused)
        x = randn(rng, 1, 5, 5, 3)
        wanted = ["Mixed_x.branch_pool", "Mixed_x.branch3x3dbl_2", "Mixed_x"]

        cpu_taps = layers.Taps(wanted)
        expected = block(x, cpu_taps)
        block.use(self.cuda)
        taps = layers.Taps(wanted, to_host=self.cuda.to_host)
        y = block(self.cuda.to_device(x), taps)
        block.use(pyincept.kernels)

        assert y.shape == expected.shape == (1, 5, 5, 64 + 64 + 96 + 4)
        close(self.cuda.to_host(y), expected, atol=1e-4)
        for name in wanted:
            close(taps.outputs[name], cpu_taps.outputs[name], atol=1e-4)
