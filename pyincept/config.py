"""Every runtime knob in one place: threads, Numba flags, micro-batches, the cache folder.

Model code reads nothing from the environment itself; it asks this module.

Environment variables
---------------------
PYINCEPT_NUM_THREADS   threads for a forward pass: a batch's images run side by side,
                       a lone image's layers split in two (default: all cores;
                       from Python: pyincept.set_num_threads(n))
PYINCEPT_CACHE         folder for downloaded and converted weights
                       (default: the platform's user cache folder, e.g. ~/.cache/pyincept)
PYINCEPT_WEIGHTS       a converted .npz to use when no --weights is given
PYINCEPT_SIMD          the matrix product's micro-kernel: auto (default: the CPU's best),
                       avx512, avx2 or generic. Every path gives the same bits; a path this
                       CPU cannot run is refused in one line (kernels/gemm.py)
"""

import os

# --- Numba -------------------------------------------------------------------
# Flags for every @njit in pyincept.kernels. cache=True writes compiled machine
# code beside the source (or to NUMBA_CACHE_DIR) so later imports skip the JIT.
# The CPU kernels are serial (no parallel=True): threads come from running batch
# shards side by side, see kernels/runtime.py, so no Numba threading layer is involved.
JIT_OPTIONS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}
# The same, for the small helpers of the hot loops, which Numba inlines into their callers.
JIT_INLINE_OPTIONS = {**JIT_OPTIONS, "inline": "always"}

# --- Batches ----------------------------------------------------------------------
# The CPU runs a batch in micro-batches of at most this many images, spread over its
# threads. Activation memory grows with the micro-batch, not the batch; 2 keeps it small
# at nearly the speed of 4 (benchmarks/NOTES.md).
MICRO_BATCH = 2

# --- CUDA (optional: pip install "pyincept[cuda]") --------------------------------
# Flags for every @cuda.jit in pyincept.kernels.cuda. cache=True keeps compiled GPU
# code on disk as for the CPU kernels; fastmath stays off so the GPU gives the CPU's
# numbers (no flushed denormals, no approximate division).
CUDA_JIT_OPTIONS = {"cache": True, "fastmath": False}
# The im2col scratch matrix on the GPU, per thread: 32M floats = 128 MB. A convolution
# whose unfolded patches are larger runs in tiles of output rows.
CUDA_SCRATCH_FLOATS = 32 << 20


def threads_from_environment():
    """PYINCEPT_NUM_THREADS as a positive int, or None when unset or not a positive number."""
    value = os.environ.get("PYINCEPT_NUM_THREADS", "").strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def simd_from_environment():
    """PYINCEPT_SIMD as given (checked by kernels.gemm.resolve_simd), "auto" when unset."""
    return os.environ.get("PYINCEPT_SIMD", "").strip() or "auto"


def num_threads():
    """Threads to use: PYINCEPT_NUM_THREADS, else every core."""
    return threads_from_environment() or os.cpu_count() or 1


# --- Caches ------------------------------------------------------------------------
# Published weights and what they travel with (URL, hash, preprocessing, labels) are the
# models' own: each model file's SPEC, collected by pyincept.models.registry.


def cache_dir():
    """Where fetched and converted weights live: $PYINCEPT_CACHE, else the user cache folder."""
    override = os.environ.get("PYINCEPT_CACHE", "").strip()
    if override:
        return os.path.abspath(os.path.expanduser(override))
    import platformdirs

    return platformdirs.user_cache_dir("pyincept", appauthor=False)
