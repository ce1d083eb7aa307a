"""pyincept's own matrix product, C = A @ B: (M, D) @ (D, K) -> (M, K), in float32.

The rule
--------
Every output is ONE fused multiply-add chain over the depth, in order:

    acc = 0;  for k = 0 .. D-1:  acc = fma(A[i, k], B[k, j], acc)      then bias, then ReLU

A fused multiply-add rounds once, so each step's result is fixed by IEEE 754 alone, and
the chain fixes the order. Nothing else is free to change the bits: not the tile shape,
not the vector width (AVX-512, AVX2 or 4 lanes), not which thread runs a tile, not the
batch an image's rows sit in, not the CPU. k is never split between threads or between
accumulators; edge tiles are padded in rows and columns, never in k; a chain stopped at
a depth block is stored as float32 and picked up again exactly; and no `reassoc`
fastmath flag reaches this code. `reference.gemm` is the same rule in three readable
lines of NumPy, and the tests hold this file to it with np.array_equal.

What follows from it: the rows of every image of a batch can share one product (each
panel of weights is read once per batch, not once per image), and an image's outputs
are the same bits alone or in any batch, on any thread count, on any CPU with FMA (and,
through llvm.fma's exact software fallback, on any CPU at all).

The layers (BLIS: van Zee and van de Geijn, "BLIS: A Framework for Rapidly
Instantiating BLAS Functionality", 2015)
--------------------------------------------------------------------------------
1. The micro-kernel (`_micro_kernel`), the only code written for the machine: one tile
   of MR rows x NR columns of C, its MR * NR / lanes accumulators held in vector
   registers through the whole depth, each step one broadcast of A[i, k] per row and one
   `llvm.fma.vNf32` per accumulator. Numba has no vector types, so it is an @intrinsic
   in llvmlite IR; plain Numba loops never keep a GEMM's accumulators in registers.
2. Packing (`pack_weights`): B, the weights, once at load, into panels of NR columns,
   (P, D, NR), padded with zero columns: each step of the micro-kernel reads NR
   consecutive floats. A, the activations, is read where its producer wrote it (im2col's
   rows, a Winograd transform's rows, a 1x1's input itself), row-major: no packing pass.
3. The driver (`_gemm`): blocks of MC rows (A's block stays in L2) by KC of depth (B's
   micro-panel stays in L1) by panels, tile after tile; the bias and ReLU are applied in
   the registers of the last depth block, so no second pass reads C.

Shape letters: M rows (output pixels, Winograd tiles or images), D depth (R*S*C), K
columns (output channels); MR x NR the micro-kernel's tile, P = ceil(K / NR) panels.
"""

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config
from ..errors import PyinceptError
from .runtime import _as_f32, _jit, _jit_inline, aligned_zeros


# --- which micro-kernel this CPU runs ---------------------------------------------------


class Simd(NamedTuple):
    """A micro-kernel's shape: `rows` broadcasts of A by `vectors` vectors of `lanes` floats
    of B each step, rows * vectors accumulators in registers."""
    name: str
    code: int           # how the jitted driver tells the paths apart
    lanes: int
    vectors: int
    rows: int           # MR
    requires: tuple     # the CPU features it needs (llvmlite's names)

    @property
    def nr(self):       # NR: columns of a tile, of a weight panel
        return self.lanes * self.vectors


# AVX-512: 24 accumulators of the 32 zmm registers; AVX2: 12 of the 16 ymm (BLIS's 6x16);
# generic: 4-lane vectors (SSE, NEON), where llvm.fma becomes whatever the CPU has.
SIMD_PATHS = {
    "avx512": Simd("avx512", 2, 16, 2, 12, ("avx512f", "fma")),
    "avx2": Simd("avx2", 1, 8, 2, 6, ("avx2", "fma")),
    "generic": Simd("generic", 0, 4, 2, 4, ()),
}
SIMD_CHOICES = ("auto", *SIMD_PATHS)


def host_features():
    """The CPU features LLVM sees on this machine (the ones Numba compiles for)."""
    import llvmlite.binding as llvm

    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def runnable_paths(features=None):
    """The SIMD paths this CPU can run, fastest first."""
    features = host_features() if features is None else features
    return [name for name, path in SIMD_PATHS.items() if set(path.requires) <= features]


def resolve_simd(choice, features=None):
    """PYINCEPT_SIMD's value -> a Simd, or a one-line PyinceptError for an unknown name or a
    path this CPU cannot run (never an illegal-instruction crash later)."""
    choice = (choice or "auto").strip().lower()
    if choice not in SIMD_CHOICES:
        raise PyinceptError(f"PYINCEPT_SIMD={choice!r} is not a SIMD path: use one of {', '.join(SIMD_CHOICES)}")
    paths = runnable_paths(features)
    if choice == "auto":
        return SIMD_PATHS[paths[0]]
    if choice not in paths:
        missing = sorted(set(SIMD_PATHS[choice].requires) - (host_features() if features is None else features))
        raise PyinceptError(f"PYINCEPT_SIMD={choice}: this CPU lacks {', '.join(missing)}; "
                            f"it can run {', '.join(paths)}")
    return SIMD_PATHS[choice]


_simd = None


def simd():
    """The path every product of this process runs (PYINCEPT_SIMD, else the CPU's best),
    chosen once: weights are packed for its NR."""
    global _simd
    if _simd is None:
        _simd = resolve_simd(config.simd_from_environment())
    return _simd


# --- 1. the micro-kernel ---------------------------------------------------------------


def _micro_kernel(rows, vectors, lanes, prefetch=16):
    """An @intrinsic computing one MR x NR tile of C (MR = rows, NR = vectors * lanes),
    asking for B's row k + `prefetch` while it works on row k (weights are cold in a
    forward pass: they come from memory once per layer; 1.05-1.1x, benchmarks/NOTES.md):

        tile(kc, mr, nr, a, a_off, lda, b, b_off, c, c_off, ldc, first, bias, bias_off, relu, finish)

    acc[r, :] starts at 0 (first) or at C's row r (a chain picked up after an earlier
    depth block); then for k = 0 .. kc-1: acc[r, :] = fma(A[r, k], B[k, :], acc[r, :]),
    with A[r, k] = a[a_off + r*lda + k] and B[k, :] = b[b_off + k*NR : ... + NR]; then,
    when `finish`, acc += bias[bias_off : + NR] and, when `relu`, acc = max(acc, 0) (a NaN
    stays NaN); the tile goes to c[c_off + r*ldc : ... + NR]. An edge tile has mr < MR
    rows or nr < NR columns in C: its rows past mr read row mr-1 of A again and are never
    stored, and its columns past nr are loaded and stored under a lane mask (llvm.masked.*),
    so nothing outside C's mr x nr corner is touched.
    """
    NR = vectors * lanes
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, lanes)
    array = types.Array(types.float32, 1, "C")

    def operand(arg):
        """A 1-D C-contiguous float32 array; A, B and the bias may be read-only."""
        return isinstance(arg, types.Array) and arg.dtype == types.float32 and arg.ndim == 1 and arg.layout == "C"

    @intrinsic
    def tile(typingctx, kc, mr, nr, a, a_off, lda, b, b_off, c, c_off, ldc, first, bias, bias_off, relu, finish):
        if not (operand(a) and operand(b) and operand(bias) and c == array):
            return None
        sig = types.void(types.intp, types.intp, types.intp, a, types.intp, types.intp, b, types.intp, array,
                         types.intp, types.intp, types.boolean, bias, types.intp, types.boolean, types.boolean)

        def codegen(context, builder, signature, args):
            kc, mr, nr, a, a_off, lda, b, b_off, c, c_off, ldc, first, bias, bias_off, relu, finish = args
            data = [context.make_array(signature.args[i])(context, builder, args[i]).data for i in (3, 6, 8, 12)]
            a_ptr, b_ptr, c_ptr, bias_ptr = data
            intp = context.get_value_type(types.intp)

            def const(v):
                return ir.Constant(intp, v)

            def vector_at(ptr, offset):
                return builder.bitcast(builder.gep(ptr, [offset]), vec.as_pointer())

            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.fma.v{lanes}f32")
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                   "llvm.prefetch.p0")
            bits = ir.VectorType(ir.IntType(1), lanes)
            masked_load = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec.as_pointer(), i32, bits, vec]), f"llvm.masked.load.v{lanes}f32.p0")
            masked_store = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [vec, vec.as_pointer(), i32, bits]),
                f"llvm.masked.store.v{lanes}f32.p0")
            acc = [[cgutils.alloca_once(builder, vec) for _ in range(vectors)] for _ in range(rows)]

            def c_offset(r, v):
                return builder.add(c_off, builder.add(builder.mul(const(r), ldc), const(v * lanes)))

            # An edge tile's lanes: column v*lanes + l is C's while it is below nr.
            whole = builder.and_(builder.icmp_signed("==", mr, const(rows)), builder.icmp_signed("==", nr, const(NR)))
            wide = ir.VectorType(intp, lanes)
            nr_splat = builder.shuffle_vector(builder.insert_element(ir.Constant(wide, ir.Undefined), nr,
                                                                     ir.Constant(i32, 0)),
                                              ir.Constant(wide, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
            lane_mask = [builder.icmp_signed("<", ir.Constant(wide, [v * lanes + l for l in range(lanes)]), nr_splat)
                         for v in range(vectors)]

            def for_c(action):
                """action(r, v) for every vector of the tile in C: all of them in a whole tile,
                only rows below mr (under their lane masks) in an edge tile."""
                with builder.if_else(whole) as (full, edge):
                    with full:
                        for r in range(rows):
                            for v in range(vectors):
                                action(r, v, None)
                    with edge:
                        for r in range(rows):
                            with builder.if_then(builder.icmp_signed("<", const(r), mr)):
                                for v in range(vectors):
                                    action(r, v, lane_mask[v])

            def load_c(r, v, mask):
                at = vector_at(c_ptr, c_offset(r, v))
                value = (builder.load(at, align=4) if mask is None else
                         builder.call(masked_load, [at, ir.Constant(i32, 4), mask, ir.Constant(vec, [0.0] * lanes)]))
                builder.store(value, acc[r][v])

            def store_c(r, v, mask):
                at = vector_at(c_ptr, c_offset(r, v))
                if mask is None:
                    builder.store(builder.load(acc[r][v]), at, align=4)
                else:
                    builder.call(masked_store, [builder.load(acc[r][v]), at, ir.Constant(i32, 4), mask])

            # Each row's start in A, computed once: rows past mr point at row mr - 1.
            row_ptr = []
            for r in range(rows):
                rr = builder.select(builder.icmp_signed("<", const(r), mr), const(r), builder.sub(mr, const(1)))
                row_ptr.append(builder.gep(a_ptr, [builder.add(a_off, builder.mul(rr, lda))]))
            with builder.if_else(first) as (fresh, resumed):
                with fresh:
                    for r in range(rows):
                        for v in range(vectors):
                            builder.store(ir.Constant(vec, [0.0] * lanes), acc[r][v])
                with resumed:
                    for r in range(rows):                                  # rows past mr: never stored
                        for v in range(vectors):
                            builder.store(ir.Constant(vec, [0.0] * lanes), acc[r][v])
                    for_c(load_c)
            lane0 = ir.Constant(ir.IntType(32), 0)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            undef = ir.Constant(vec, ir.Undefined)
            with cgutils.for_range(builder, kc) as loop:                       # k = 0 .. kc-1, in order
                k = loop.index
                b_row = builder.add(b_off, builder.mul(k, const(NR)))
                bk = [builder.load(vector_at(b_ptr, builder.add(b_row, const(v * lanes))), align=4)
                      for v in range(vectors)]                                 # B[k, :], NR floats
                if prefetch:                                                   # B's row k + prefetch, on its way
                    ahead = builder.gep(b_ptr, [builder.add(b_row, const(prefetch * NR))])
                    for line in range(0, NR * 4, 64):
                        at = builder.gep(builder.bitcast(ahead, i8p), [ir.Constant(i32, line)])
                        builder.call(fetch, [at, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
                for r in range(rows):
                    s = builder.load(builder.gep(row_ptr[r], [k]))            # A[r, k]
                    ark = builder.shuffle_vector(builder.insert_element(undef, s, lane0), undef, splat)
                    for v in range(vectors):
                        builder.store(builder.call(fma, [ark, bk[v], builder.load(acc[r][v])]), acc[r][v])
            with builder.if_then(finish):
                zero = ir.Constant(vec, [0.0] * lanes)
                never = ir.Constant(ir.VectorType(ir.IntType(1), lanes), [0] * lanes)
                for v in range(vectors):
                    bv = builder.load(vector_at(bias_ptr, builder.add(bias_off, const(v * lanes))), align=4)
                    for r in range(rows):
                        y = builder.fadd(builder.load(acc[r][v]), bv)
                        negative = builder.select(relu, builder.fcmp_ordered("<", y, zero), never)   # NaN: false
                        builder.store(builder.select(negative, zero, y), acc[r][v])
            for_c(store_c)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_TILES = {name: _micro_kernel(p.rows, p.vectors, p.lanes) for name, p in SIMD_PATHS.items()}
_tile_avx512, _tile_avx2, _tile_generic = _TILES["avx512"], _TILES["avx2"], _TILES["generic"]


@_jit_inline
def _tile(code, kc, mr, nr, a, a_off, lda, b, b_off, c, c_off, ldc, first, bias, bias_off, relu, finish):
    """The micro-kernel of SIMD path `code` (Simd.code: a constant of each driver, so only
    its own branch is compiled into it)."""
    if code == 2:
        _tile_avx512(kc, mr, nr, a, a_off, lda, b, b_off, c, c_off, ldc, first, bias, bias_off, relu, finish)
    elif code == 1:
        _tile_avx2(kc, mr, nr, a, a_off, lda, b, b_off, c, c_off, ldc, first, bias, bias_off, relu, finish)
    else:
        _tile_generic(kc, mr, nr, a, a_off, lda, b, b_off, c, c_off, ldc, first, bias, bias_off, relu, finish)


# --- 3. the driver ---------------------------------------------------------------------


def _driver(path):
    """The blocked driver, compiled for one SIMD path: its tile shape and blocking are
    constants of the compiled code (a closure's cells, which Numba's cache keys on), so
    LLVM sees one micro-kernel and keeps every accumulator of it in registers."""
    code, MR, NR = path.code, path.rows, path.nr
    KC, MC = blocking(path)

    @_jit
    def gemm(a, a_off, lda, a_step, i0, i1, D, b, b_off, b_step, j0, j1, K, c, c_off, ldc, c_step, e0, e1,
             bias, relu, finish):
        """Rows i0 .. i1-1 and panels j0 .. j1-1 of C = A @ B, for the products e0 .. e1-1 of a
        stack (one, or a Winograd layer's points), by the rule (the file's docstring).

        Product e: A[i, k] = a[a_off + e*a_step + i*lda + k]; B's panel j is the (D, NR) block at
        b[b_off + e*b_step + j*D*NR]; C[i, col] = c[c_off + e*c_step + i*ldc + col], col < K.
        finish: add bias[col] (padded to whole panels) and, if relu, clamp at 0. Tiles that
        overhang C's last row or column are stored under masks by the micro-kernel.
        """
        blocks = -(-D // KC)                                       # depth blocks, of equal size:
        step = -(-D // blocks)                                     # no short last block reloading C
        for e in range(e0, e1):
            ae, be, ce = a_off + e * a_step, b_off + e * b_step, c_off + e * c_step
            for ic in range(i0, i1, MC):                           # a block of rows: A's, in L2
                ie = min(i1, ic + MC)
                for pc in range(0, D, step):                       # a block of depth, in order
                    kc = min(step, D - pc)
                    first, last = pc == 0, pc + kc == D
                    for j in range(j0, j1):                        # a panel: its kc x NR part in L1
                        nr = min(NR, K - j * NR)
                        b_at = be + j * D * NR + pc * NR
                        for i in range(ic, ie, MR):
                            _tile(code, kc, min(MR, ie - i), nr, a, ae + i * lda + pc, lda, b, b_at,
                                  c, ce + i * ldc + j * NR, ldc, first, bias, j * NR, relu, finish and last)

    return gemm


def blocking(path):
    """(KC, MC) for a path: a kc x NR micro-panel of B of 16 KB (half an L1), and an
    MC x KC block of A of about 256 KB (half of the smallest L2 these machines have)."""
    KC = 4096 // path.nr
    MC = max(path.rows, (65536 // KC) // path.rows * path.rows)
    return KC, MC


_DRIVERS = {name: _driver(path) for name, path in SIMD_PATHS.items()}


# --- 2. weights in panels ----------------------------------------------------------------


class Panels:
    """A weight matrix B (D, K), or a stack of them (..., D, K), packed for the micro-kernel:
    `data` (..., P, D, NR), column j of B in panel j // NR, lane j % NR, the last panel
    padded with zero columns. `shape` is the logical shape it was packed from (say the
    conv's HWIO (R, S, C, K)), `path` the SIMD path whose NR it has."""

    def __init__(self, data, shape, path):
        self.data, self.shape, self.path = data, tuple(shape), path

    @property
    def depth(self):
        return self.data.shape[-2]

    @property
    def columns(self):
        return self.shape[-1]

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def nbytes(self):
        return self.data.nbytes

    def __len__(self):
        return self.shape[0]

    def unpack(self):
        """The weights as packed, in their logical shape."""
        *lead, P, D, NR = self.data.shape
        b = np.moveaxis(self.data, -2, -3).reshape(*lead, D, P * NR)[..., : self.columns]
        return np.ascontiguousarray(b).reshape(self.shape)

    def __array__(self, dtype=None, copy=None):
        """np.asarray(panels): the weights in their logical shape (a copy)."""
        return self.unpack() if dtype is None else self.unpack().astype(dtype)

    def __repr__(self):
        return f"Panels(shape={self.shape}, path={self.path.name}, data={self.data.shape})"


def pack_weights(w, path=None):
    """Weights (..., D, K) or conv filters HWIO (R, S, C, K) -> Panels, packed once (at load).
    A (R, S, C, K) array packs as its (R*S*C, K) matrix; a Winograd bank (n, C, K) as n
    matrices. A list of arrays packs as their concatenation along K (a fused 1x1's members),
    without making that copy. Panels are passed through."""
    if isinstance(w, Panels):
        return w
    path = path or simd()
    blocks = [_as_f32(b) for b in (w if isinstance(w, (list, tuple)) else [w])]
    shape = (*blocks[0].shape[:-1], sum(b.shape[-1] for b in blocks))
    if len(shape) < 2 or any(b.shape[:-1] != blocks[0].shape[:-1] for b in blocks):
        raise ValueError(f"weights to pack must be (D, K) or (..., D, K), got {[b.shape for b in blocks]}")
    if len(shape) == 4:                                            # HWIO filters: (R*S*C, K)
        blocks = [b.reshape(-1, b.shape[3]) for b in blocks]
    *lead, D, K = (*blocks[0].shape[:-1], shape[-1])
    NR = path.nr
    P = -(-K // NR)
    data = aligned_zeros((*lead, P, D, NR))                        # (..., P, D, NR)
    k0 = 0
    for b in blocks:                                               # column k of B: panel k // NR, lane k % NR
        k = 0
        while k < b.shape[-1]:
            j, lane = divmod(k0 + k, NR)
            take = min(NR - lane, b.shape[-1] - k)                 # up to the end of this panel
            data[..., j, :, lane : lane + take] = b[..., k : k + take]
            k += take
        k0 += b.shape[-1]
    return Panels(data, shape, path)


def padded_bias(bias, K, path):
    """A (K,) bias as the micro-kernel reads it: zero-padded to whole panels."""
    P = -(-K // path.nr)
    out = np.zeros(P * path.nr, np.float32)
    if bias is not None:
        out[:K] = bias
    return out


_NO_BIAS = np.zeros(1, np.float32)


def gemm_into(a, panels, c, i0=0, i1=None, j0=0, j1=None, bias=None, relu=False):
    """C[i0:i1, panel columns j0*NR .. j1*NR] = A @ B by the rule, into c (a 2-D view with
    unit column stride, any row stride: a channel window of a module's output).

    a: (M, D) float32 with unit column stride; panels: a Panels of one (D, K) matrix;
    bias: padded_bias(...) for the epilogue (then relu: clamp at 0 after it), or None for
    the raw product.
    """
    if relu and bias is None:
        raise ValueError("the ReLU epilogue comes after a bias: pass padded_bias(None, K, path) for none")
    path = panels.path
    M, D = a.shape
    i1 = M if i1 is None else i1
    j1 = panels.data.shape[-3] if j1 is None else j1
    if i1 <= i0 or j1 <= j0:
        return c
    a_flat, a_off, lda = _flat(a)
    c_flat, c_off, ldc = _flat(c)
    _run(path, a_flat, a_off, lda, 0, i0, i1, D, panels.data.reshape(-1), 0, 0, j0, j1,
         panels.columns, c_flat, c_off, ldc, 0, 0, 1, bias, relu)
    return c


def gemm_stack(v, panels, m, e0, e1, i0=0, i1=None):
    """m[e] = v[e] @ B[e] for the products e0 .. e1-1 of a stack, in one call: v (n, T, D) and
    m (n, T, P*NR) contiguous, panels of (n, D, K) (a Winograd layer's points). m's rows
    hold whole panels, so no tile is an edge in its columns; the columns past K are the
    padding's products (zeros for finite inputs), never read."""
    path = panels.path
    n, T, D = v.shape
    i1 = T if i1 is None else i1
    P = panels.data.shape[-3]
    width = P * path.nr
    if m.shape != (n, T, width) or not (v.flags.c_contiguous and m.flags.c_contiguous):
        raise ValueError(f"gemm_stack wants contiguous v (n, T, D) and m (n, T, {width}), got {v.shape} and {m.shape}")
    if e1 <= e0 or i1 <= i0:
        return m
    _run(path, v.reshape(-1), 0, D, T * D, i0, i1, D, panels.data.reshape(-1), 0, P * D * path.nr, 0, P,
         width, m.reshape(-1), 0, width, T * width, e0, e1, None, False)
    return m


def _run(path, a, a_off, lda, a_step, i0, i1, D, b, b_off, b_step, j0, j1, K, c, c_off, ldc, c_step,
         e0, e1, bias, relu):
    if D == 0:
        raise ValueError("a matrix product needs a depth of at least 1")
    finish = bias is not None
    _DRIVERS[path.name](a, a_off, lda, a_step, i0, i1, D, b, b_off, b_step, j0, j1, K, c, c_off, ldc, c_step,
                        e0, e1, bias if finish else _NO_BIAS, bool(relu), finish)


def _flat(m):
    """A 2-D float32 view with unit column stride as (its whole buffer, flat; offset of
    m[0, 0] in it; row stride), for the jitted driver."""
    if m.dtype != np.float32 or m.ndim != 2 or (m.shape[1] > 1 and m.strides[1] != 4) or m.strides[0] % 4:
        raise ValueError(f"a GEMM operand must be 2-D float32 with unit column stride, got {m.dtype} "
                         f"{m.shape} strides {m.strides}")
    if m.flags.c_contiguous:
        return m.reshape(-1), 0, m.shape[1]
    root = m
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not root.flags.c_contiguous:
        raise ValueError("a GEMM operand must be a view of a contiguous buffer")
    offset = (m.ctypes.data - root.ctypes.data) // 4
    flat = np.ndarray(root.nbytes // 4, np.float32, buffer=root)
    return flat, offset, m.strides[0] // 4 if m.shape[0] > 1 else m.shape[1]


def gemm(a, b, bias=None, relu=False):
    """C = A @ B by the rule: a (M, D), b (D, K) or Panels -> (M, K) float32. bias (K,) and
    relu make the epilogue. The same bits as `reference.gemm` (then + bias, then ReLU)."""
    a = np.ascontiguousarray(_as_f32(a))
    panels = pack_weights(b)
    if a.ndim != 2 or panels.ndim != 2 or a.shape[1] != panels.depth:
        raise ValueError(f"gemm: a {a.shape} and b {panels.shape} do not chain as (M, D) @ (D, K)")
    M, K = a.shape[0], panels.columns
    c = np.empty((M, K), np.float32)
    if a.shape[1] == 0:                                            # an empty sum
        c[:] = 0.0
        return _epilogue(c, bias, relu)
    return gemm_into(a, panels, c, bias=padded_bias(bias, K, panels.path) if bias is not None or relu else None,
                     relu=relu)


def _epilogue(c, bias, relu):
    if bias is not None:
        c += _as_f32(bias)
    if relu:
        np.maximum(c, 0, out=c)
    return c


# --- the machine's peak, measured with the micro-kernel itself -------------------------


def _peak_loop(path):
    """The micro-kernel of `path` alone, compiled as its driver is: loop(kc, a, b, c, repeats,
    bias) runs one whole tile `repeats` times on the same operands."""
    code, MR, NR = path.code, path.rows, path.nr

    @_jit
    def loop(kc, a, b, c, repeats, bias):
        for _ in range(repeats):
            _tile(code, kc, MR, NR, a, 0, kc, b, 0, c, 0, NR, True, bias, 0, False, False)

    return loop


_PEAK_LOOPS = {name: _peak_loop(path) for name, path in SIMD_PATHS.items()}


def peak_gfma(seconds=0.5, path=None):
    """One core's FMA rate (billions per second) for the micro-kernel on operands held in
    L1 (k = 256): the roof the benchmarks' roofline column divides by."""
    import time

    path = path or simd()
    kc = 256
    a = np.ones(path.rows * kc, np.float32)
    b = np.full(kc * path.nr, 1e-3, np.float32)
    c = np.empty(path.rows * path.nr, np.float32)
    bias = np.zeros(path.nr, np.float32)
    per_call = path.rows * path.nr * kc
    loop = _PEAK_LOOPS[path.name]
    loop(kc, a, b, c, 10, bias)
    best, start, repeats = 0.0, time.perf_counter(), 2000
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        loop(kc, a, b, c, repeats, bias)
        best = max(best, per_call * repeats / (time.perf_counter() - t) / 1e9)
    return best
