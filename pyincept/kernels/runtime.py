"""The CPU kernels' runtime: threads, the lone image's helper thread, scratch and
activation memory, the argument checks every wrapper shares, and the float32 constants
the kernels' arithmetic uses. The kernels themselves live in gemm, conv, winograd, pool
and dense.

How a forward pass uses the cores: `map_batch` deals a batch's micro-batches to shard
threads; a lone image's layers split their own work in two (`_side_by_side`), handing
half to a helper thread that waits spinning. Every Numba kernel is serial, the matrix
product included (gemm.py: no BLAS on the forward path). Numba flags come from `config`
(`_jit`, `_jit_inline`).
"""

import ctypes
import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config


# --- threads ------------------------------------------------------------------------
# Every Numba kernel is serial: a second thread pool (Numba's, or a BLAS's, whose idle
# threads spin after each product) fights the first for the cores (benchmarks/NOTES.md).
# So the threads are pyincept's own:
#   batch > 1: `map_batch` splits the batch into n shards that run concurrently, one per
#              thread: every core runs its own images, unfold, GEMM, epilogue and
#              pooling alike;
#   batch 1:   each layer splits its own output pixels, tiles or rows (`_side_by_side`),
#              handing one half to a helper thread that waits for it spinning (`_Helper`).

# Every kernel's Numba flags come from config: serial, no GIL held, cached on disk. Small
# helpers of the hot loops are inlined into their callers, where LLVM can vectorise them.
_jit = njit(**config.JIT_OPTIONS)
_jit_inline = njit(**config.JIT_INLINE_OPTIONS)

_threads = 1
_executor = None            # the shard threads (created on first use)
_executor_lock = threading.Lock()


def set_num_threads(n):
    """Threads for a forward pass (shards of a batch, halves of a lone image's layers); returns n."""
    global _threads, _executor
    n = max(1, int(n))
    with _executor_lock:
        if _threads != n:
            _executor = None          # dropped, not shut down: a pass on another thread may still use it
        _threads = n
    return n


def get_num_threads():
    return _threads


def map_batch(fn, N):
    """[fn(slice) for each micro-batch of a batch of N], in order, run on every thread.

    The batch is cut into micro-batches of at most config.MICRO_BATCH images (activation
    memory grows with the micro-batch, not the batch) dealt out to `_threads` shards,
    one Python thread each, running concurrently. A batch of one image runs here, its
    layers splitting their work in two (`_side_by_side`). Every output of every product
    is one FMA chain (gemm.py), whichever images share the product and whichever thread
    runs it, so an image's results are the same bits at any thread count and in any batch.
    """
    size = max(1, min(config.MICRO_BATCH, -(-N // _threads)))
    slices = [slice(i, min(N, i + size)) for i in range(0, N, size)]
    shards = min(_threads, len(slices))

    def run(group):
        return [fn(s) for s in group]

    if shards == 1:                                               # one image, or one thread
        _local.splitting = _threads > 1                           # a lone image: each layer splits its work
        try:
            return run(slices)
        finally:
            _local.splitting = False
    groups = [slices[i::shards] for i in range(shards)]          # shard i: micro-batches i, i+shards, ...
    done = list(_pool_of_threads().map(run, groups))
    results = [None] * len(slices)
    for i, group_results in enumerate(done):
        results[i::shards] = group_results
    return results


_local = threading.local()        # .splitting: this thread runs one image alone
_SIDE_BY_SIDE_MIN = 8             # pixels, tiles or rows: below this a split is not worth a thread hand-off
# Elementwise work (pool window reads, epilogue values) below this runs whole: there a
# hand-over to the helper costs about as much as the half it would save.
_SPLIT_MIN_OPS = 300_000


def _side_by_side(work, count, ops=None, smallest=_SIDE_BY_SIDE_MIN):
    """work(0, count), as work(0, half) here and work(half, count) on a second thread,
    while map_batch runs one image alone (`_local.splitting`).

    At batch 1 there are no images to run side by side, so each layer splits its own
    work: the tiles or weight panels of its matrix products (unfold, GEMM and epilogue
    of each), Winograd points, pool rows or epilogue pixels. The Numba kernels, the GEMM
    included, release the GIL, so the halves run at once. Anywhere else (inside a shard, or a kernel
    called on its own) the work runs whole, as does work of fewer than `smallest` items
    or elementwise work of fewer than _SPLIT_MIN_OPS `ops`. Who runs an item never
    changes its numbers: work(a, b) computes items a .. b-1 the same way on any thread.
    """
    if (not getattr(_local, "splitting", False) or count < smallest
            or (ops is not None and ops < _SPLIT_MIN_OPS)):
        work(0, count)
        return
    helper = _split_helper()
    if not helper.lock.acquire(blocking=False):                 # another thread's lone image has it
        work(0, count)
        return
    try:
        half = count // 2
        helper.start(work, half, count)
        try:
            work(0, half)
        finally:
            helper.wait()
    finally:
        helper.lock.release()


@intrinsic
def _load_acquire(typingctx, flags, i):
    """flags[i] (int64) read by an atomic load: read afresh on every call, so a loop that
    waits for another thread's store is not compiled into a loop over one stale value."""
    if not (isinstance(flags, types.Array) and flags.dtype == types.int64 and flags.ndim == 1):
        return None
    sig = types.int64(flags, types.intp)

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], array, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def _store_seq_cst(typingctx, flags, i, value):
    """flags[i] = value (int64) by a sequentially consistent atomic store: a full fence, so
    a load after it in this thread cannot be served before other threads see the store."""
    if not (isinstance(flags, types.Array) and flags.dtype == types.int64 and flags.ndim == 1):
        return None
    sig = types.void(flags, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], array, [args[1]])
        builder.store_atomic(args[2], ptr, "seq_cst", 8)
        return context.get_dummy_value()

    return sig, codegen


@_jit
def _spin_until(flags, i, value, spins):
    """Wait, without the GIL, until flags[i] >= value: True, or False after `spins` reads."""
    for _ in range(spins):
        if _load_acquire(flags, i) >= value:
            return True
    return False


@_jit
def _set_flag(flags, i, value):
    """flags[i] = value, seq_cst (`_store_seq_cst`), from Python."""
    _store_seq_cst(flags, i, value)


@_jit
def _publish_then_spin(flags, i, value, asleep, j, target, spins):
    """flags[i] = value, without the GIL, then `_spin_until(flags, j, target, spins)`; -1
    at once instead if flags[asleep] is set (someone to wake, which takes the GIL)."""
    _store_seq_cst(flags, i, value)
    if _load_acquire(flags, asleep):
        return -1
    return 1 if _spin_until(flags, j, target, spins) else 0


class _Helper:
    """The second thread of a lone image: runs one half of a layer while the caller runs
    the other, and waits for the next half by spinning on a flag (without the GIL).

    Why spin: a sleeping thread's core halts, and waking it takes an interrupt, tens of
    microseconds, while a forward pass hands over about 80 halves; spinning, a round trip
    takes microseconds (benchmarks/NOTES.md). Each side spins at most `SPINS` reads (about
    1.6 ms), then sleeps on an Event, so an idle process does not keep a core busy.
    """

    SPINS = 3_000_000
    POSTED, DONE, HELPER_ASLEEP, CALLER_ASLEEP = range(4)

    def __init__(self):
        self.flags = np.zeros(4, np.int64)
        self.lock = threading.Lock()             # one lone image at a time uses the helper
        self.job = None
        self.error = None
        self.posted = 0
        self.wake_helper, self.wake_caller = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, name="pyincept-helper", daemon=True).start()

    def start(self, work, first, last):
        """Post work(first, last) to the helper thread."""
        self.job = (work, first, last)
        self.posted += 1
        self.flags[self.POSTED] = self.posted
        if self.flags[self.HELPER_ASLEEP]:
            self.wake_helper.set()

    def wait(self):
        """Until the posted work is done; re-raise what it raised."""
        flags = self.flags
        while not _spin_until(flags, self.DONE, self.posted, self.SPINS):
            _set_flag(flags, self.CALLER_ASLEEP, 1)          # then read DONE: pairs with
            if flags[self.DONE] < self.posted:               # _publish_then_spin, so one of
                self.wake_caller.wait(0.05)                  # the two sees the other's flag
            self.wake_caller.clear()
            flags[self.CALLER_ASLEEP] = 0
        error, self.error = self.error, None
        if error is not None:
            raise error

    def _serve(self):
        flags, seq = self.flags, 0
        while True:
            seq += 1
            # Half seq - 1 is published done only once this thread has let go of the GIL,
            # so the caller, spinning on DONE, takes the GIL back without waiting for it:
            # published under the GIL, the caller often slept on the GIL instead.
            ready = _publish_then_spin(flags, self.DONE, seq - 1, self.CALLER_ASLEEP,
                                       self.POSTED, seq, self.SPINS)
            if ready < 0:
                self.wake_caller.set()
                ready = _spin_until(flags, self.POSTED, seq, self.SPINS)
            while not ready:
                flags[self.HELPER_ASLEEP] = 1                # both flags are read and written under
                if flags[self.POSTED] < seq:                 # the GIL, so no wake-up is missed
                    self.wake_helper.wait(0.05)
                self.wake_helper.clear()
                flags[self.HELPER_ASLEEP] = 0
                ready = _spin_until(flags, self.POSTED, seq, self.SPINS)
            work, first, last = self.job
            try:
                work(first, last)
            except BaseException as e:                       # handed to the caller by wait()
                self.error = e
            finally:
                self.job = None


_helper = None
_helper_lock = threading.Lock()


def _split_helper():
    global _helper
    if _helper is None:
        with _helper_lock:
            if _helper is None:
                _helper = _Helper()
    return _helper


def _forget_threads():
    """In a forked child: the parent's helper and shard threads do not exist there."""
    global _helper, _helper_lock, _executor, _executor_lock
    _helper, _helper_lock, _executor, _executor_lock = None, threading.Lock(), None, threading.Lock()


os.register_at_fork(after_in_child=_forget_threads)


def _pool_of_threads():
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(_threads, thread_name_prefix="pyincept")
        return _executor


set_num_threads(config.num_threads())   # PYINCEPT_NUM_THREADS, else every core


# Constants of the kernels' arithmetic as float32: in Numba a float64 literal or an
# integer times a float32 value computes in float64, at half the vector width and with
# conversions (and `v = 0.0` makes v float64 throughout).
F0, F0_25, F0_5, F1_25, F2, F2_5, F4, F4_25, F5, F5_25, F8 = (
    np.float32(c) for c in (0, 0.25, 0.5, 1.25, 2, 2.5, 4, 4.25, 5, 5.25, 8))


def aligned_empty(shape, dtype=np.float32):
    """An uninitialised array whose first element sits on a 64-byte boundary: a cache line,
    so the GEMM's vector loads of weight panels and stores of output rows never straddle
    two lines (up to 1.2x on a Winograd layer's products, benchmarks/NOTES.md)."""
    size = math.prod(shape)
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(size * itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size * itemsize].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype=np.float32):
    a = aligned_empty(shape, dtype)
    a.fill(0)
    return a


_scratch_buffers = threading.local()   # concurrent shards and forward passes never share


def _scratch(role, shape):
    """A reusable float32 buffer of at least `shape`, one per role and thread (grown, never shrunk)."""
    buffers = _scratch_buffers.__dict__
    size = math.prod(shape)
    buf = buffers.get(role)
    if buf is None or buf.size < size:
        buf = buffers[role] = aligned_empty((size,))
    return buf[:size].reshape(shape)


def _zeros(K):
    return np.zeros(K, np.float32)


def _bias_vector(bias, K):
    """A conv's bias as float32 (K,): zeros when there is none."""
    bias = _zeros(K) if bias is None else _as_f32(bias)
    if bias.shape != (K,):
        raise ValueError(f"bias must be ({K},), got {bias.shape}")
    return bias


def _channel_window(x):
    """(parent, c0) with parent[..., c0 : c0 + C] being x itself (same memory) and parent
    C-contiguous: x when it is contiguous; for a channel slice of a contiguous array (a
    module's branch columns) a (N, H, W, row) view over the same buffer; else a copy.
    Any c0 that keeps the view inside the buffer will do: only x's channels are read."""
    if x.flags.c_contiguous:
        return x, 0
    N, H, W, C = x.shape
    item = x.itemsize
    row = x.strides[2] // item                                         # floats from one pixel to the next
    root = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    offset = x.ctypes.data - root.ctypes.data                         # bytes from the buffer's start to x
    if (x.strides[3] == item and x.strides[2] == row * item and x.strides[1] == W * row * item
            and x.strides[0] == H * W * row * item and root.flags.c_contiguous and offset >= 0):
        parent_bytes = N * H * W * row * item
        c0 = max(0, -(-(offset + parent_bytes - root.nbytes) // item))   # start early enough to end in the buffer
        if c0 + C <= row and c0 * item <= offset:
            return np.ndarray((N, H, W, row), x.dtype, buffer=root, offset=offset - c0 * item), c0
    return np.ascontiguousarray(x), 0


def _output_window(out):
    """(parent, d0) as `_channel_window` gives them for a kernel's output, or None where
    out is no window of a contiguous buffer (every other row, say): there the window
    would be a copy and the results written into it lost, so the caller computes into a
    new array and copies that into out."""
    parent, d0 = _channel_window(out)
    return (parent, d0) if np.may_share_memory(parent, out) else None


# --- memory: the CPU's device is the host ---------------------------------------------


class Arena:
    """Recycles activation buffers between forward passes.

    Why: glibc hands every allocation over 32 MB to mmap and returns it to the kernel
    on free, so a fresh batch-8 stem activation is page-faulted and zeroed on every
    call. Here a buffer whose array has died goes on a free list keyed by its size,
    and the next request of that size (the same layer, next call) takes it back.

    Liveness is Python's own. Each array handed out is built on a fresh `_Lease` object
    (through the array interface), so it and every view of it (a channel slice, a
    reshape) keep that lease alive; `weakref.finalize` fires when the last of them is
    gone. Nothing still in use is ever reused, and the arena holds at most the largest
    set of buffers that were alive at once, per size.
    """

    def __init__(self, min_bytes=32 << 20):
        self.min_bytes = min_bytes          # smaller arrays: glibc's heap reuses them already
        self.free = {}                      # nbytes -> [flat float32 buffers]
        self.lock = threading.Lock()

    def empty(self, shape):
        size = math.prod(shape)
        if size * 4 < self.min_bytes:
            return aligned_empty(shape)
        with self.lock:
            spare = self.free.get(size)
            base = spare.pop() if spare else None
        if base is None:
            base = aligned_empty((size,))
        lease = _Lease(base, shape)
        weakref.finalize(lease, self._release, base)
        return np.asarray(lease)

    def _release(self, base):
        with self.lock:
            self.free.setdefault(base.size, []).append(base)

    def clear(self):
        """Give every spare buffer back to the allocator."""
        with self.lock:
            self.free.clear()


class _Lease:
    """One loan of an arena buffer: the object every array and view of this loan points to."""

    def __init__(self, base, shape):
        self.base = base
        self.__array_interface__ = dict(base.__array_interface__, shape=tuple(shape), strides=None)


ARENA = Arena()


def release_freed_memory():
    """Hand the heap pages of freed arrays back to the OS, which glibc otherwise keeps for
    later: after loading, the weight file's arrays (folded into the kernels' own forms, then
    dropped) are about 40 MB of Inception v3's resident memory. A no-op (False) where the C
    library has no malloc_trim (macOS, musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))


def empty(shape):
    """An uninitialised float32 activation buffer (recycled through ARENA when large)."""
    return ARENA.empty(shape)


def to_device(a):
    """Weights or inputs onto this backend's memory: for the CPU, a contiguous float32 array."""
    return np.ascontiguousarray(a, dtype=np.float32)


def to_host(a):
    """This backend's array as a NumPy array (the CPU's already is)."""
    return a


# --- argument checks --------------------------------------------------------------


def _as_f32(a):
    return np.asarray(a, dtype=np.float32)


def _check_nhwc(x, name, contiguous=True):
    x = np.asarray(x, dtype=np.float32)
    if contiguous:
        x = np.ascontiguousarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be NHWC (N, H, W, C), got shape {x.shape}")
    return x


def _output(out, shape):
    if out is None:
        return empty(shape)
    if out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
    return out
