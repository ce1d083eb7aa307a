"""Feature statistics that stream and merge: the mean and covariance FID compares.

A `FeatureStats` holds three float64 sums over the images it has seen, n, s = sum x and
S = sum x x^T, from which

    mu    = s / n
    sigma = (S - n mu mu^T) / (n - 1)        (np.cov(features, rowvar=False), unbiased)

Sums add, so statistics of any number of batches, processes or machines merge exactly by
adding them (`merge`). Two promises:

* The same images in the same order give the same bits whatever the batches they came in:
  features are summed in fixed blocks of BLOCK images, the last block padded with zero rows
  (which add exact zeros), so every product is the same (BLOCK, D) GEMM.
* float64 throughout. A float32 feature times a float32 feature is exact in float64; what
  rounds is the summation, about 1e-16 relative per add, and the one-pass formula for
  sigma, which loses about (|mu| / std)^2 * 1e-16: negligible for Inception's features.

Files are `.npz` that pytorch-fid reads (`np.load(f)["mu"]`, `["sigma"]`) and writes;
pyincept's also carry `count`, `sum` and `outer_sum` for merging, and what made them
(`feature`, `protocol`, `model`). Loaded with `allow_pickle=False`.
"""

import numpy as np
from scipy.linalg.blas import dgemm

from ..errors import PyinceptError

BLOCK = 64                 # images per accumulation GEMM
FORMAT = "pyincept-feature-stats-1"


class FeatureStats:
    """Streaming count, sum and sum of outer products of D-dimensional features, in float64."""

    def __init__(self, dims, meta=None):
        self.dims = int(dims)
        self.meta = dict(meta or {})            # feature, protocol, model: what made these
        self.count = 0                          # every row added, the pending block's included
        self._sum = np.zeros(self.dims, np.float64)                     # of the finished blocks
        self._outer = np.zeros((self.dims, self.dims), np.float64)
        self._block = np.zeros((BLOCK, self.dims), np.float64)          # the block being filled
        self._filled = 0
        self._moments = None                    # (mu, sigma) of a file that has no sums

    # --- accumulate -------------------------------------------------------------------

    def add(self, features):
        """Add (N, D) features (N may be 0)."""
        self._check_sums("add to")
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.dims:
            raise PyinceptError(f"features of shape {features.shape} do not fit {self.dims}-d statistics")
        row = 0
        while row < len(features):
            take = min(BLOCK - self._filled, len(features) - row)
            self._block[self._filled : self._filled + take] = features[row : row + take]
            self._filled += take
            self.count += take
            row += take
            if self._filled == BLOCK:
                self._sum, self._outer = self._with_block(self._sum, self._outer)
                self._block[:] = 0.0
                self._filled = 0
        return self

    def _with_block(self, total, outer):
        """(total, outer) plus the block's sum and block^T block; the block's unfilled rows are
        zeros, which add exact zeros, so every block is the same (BLOCK, D) product.
        outer is updated in place: BLAS's dgemm with beta = 1 writes into its (Fortran-ordered)
        transpose view, which for a symmetric sum is the same matrix: no 32 MB temporary."""
        total += self._block.sum(axis=0)
        updated = dgemm(1.0, self._block, self._block, beta=1.0, c=outer.T, trans_a=True, overwrite_c=True)
        if not np.shares_memory(updated, outer):                        # not in place after all
            outer = np.ascontiguousarray(updated.T)
        return total, outer

    def totals(self):
        """(sum x, sum x x^T) over every image added, the pending block's included (float64)."""
        return self._with_block(self._sum.copy(), self._outer.copy()) if self._filled else (self._sum, self._outer)

    @property
    def sum(self):
        return self.totals()[0]

    @property
    def outer_sum(self):
        return self.totals()[1]

    def merge(self, other):
        """Add another's statistics to these (same dims): the statistics of both sets.
        The other's finished blocks add as sums; its pending rows join this block."""
        self._check_sums("merge")
        other._check_sums("merge")
        if other.dims != self.dims:
            raise PyinceptError(f"cannot merge {other.dims}-d statistics into {self.dims}-d ones")
        self._sum += other._sum
        self._outer += other._outer
        self.count += other.count - other._filled
        return self.add(other._block[: other._filled])

    @property
    def mu(self):
        if self._moments is not None:
            return self._moments[0]
        self._need(1)
        return self.sum / self.count

    @property
    def sigma(self):
        if self._moments is not None:
            return self._moments[1]
        self._need(2)
        total, outer = self.totals()
        mu = total / self.count
        sigma = (outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (sigma + sigma.T) / 2                                   # exactly symmetric

    def _need(self, n):
        if self.count < n:
            what = "a mean" if n == 1 else "a covariance"
            raise PyinceptError(f"{self.count} image(s) give no {what}: statistics need at least {n}")

    def _check_sums(self, action):
        if self._moments is not None:
            raise PyinceptError(f"cannot {action} statistics read from a file of mu and sigma only (no sums)")

    @classmethod
    def from_sums(cls, count, total, outer, meta=None):
        """Statistics from another's `count`, `sum` and `outer_sum` (a shard's, a file's)."""
        total = np.array(total, np.float64)
        stats = cls(len(total), meta)
        stats.count, stats._sum, stats._outer = int(count), total, np.array(outer, np.float64, order="C")
        return stats

    @classmethod
    def from_features(cls, features, meta=None):
        features = np.asarray(features)
        return cls(features.shape[1], meta).add(features)

    # --- files ------------------------------------------------------------------------

    def save(self, path):
        """Write a `.npz` pytorch-fid reads (mu, sigma) with the sums for merging.
        Written to a temporary name and renamed, so a file is whole or absent."""
        from ..io.files import write_atomically

        arrays = {"mu": self.mu, "sigma": self.sigma, "format": np.array(FORMAT)}
        if self._moments is None:
            total, outer = self.totals()
            arrays.update(count=np.array(self.count, np.int64), sum=total, outer_sum=outer)
        arrays.update({f"meta_{k}": np.array(str(v)) for k, v in self.meta.items()})
        write_atomically(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path):
        """Statistics from a `.npz` with `mu` and `sigma` (pytorch-fid's, torch-fidelity's,
        pyincept's). With pyincept's sums they can be merged; without, only compared."""
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise PyinceptError(f"{path}: no such file") from None
        except (OSError, ValueError) as e:
            raise PyinceptError(f"{path}: not a statistics file ({_first_line(e)})") from None
        if "mu" not in arrays or "sigma" not in arrays:
            raise PyinceptError(f"{path}: not a statistics file (no 'mu' and 'sigma' arrays)")
        mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise PyinceptError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a D vector and a D x D matrix")
        meta = {k[5:]: str(v) for k, v in arrays.items() if k.startswith("meta_")}
        if {"count", "sum", "outer_sum"} <= arrays.keys():
            if arrays["sum"].shape != mu.shape or arrays["outer_sum"].shape != sigma.shape:
                raise PyinceptError(f"{path}: its sums do not match its {len(mu)}-d mu and sigma")
            return cls.from_sums(arrays["count"], arrays["sum"], arrays["outer_sum"], meta)
        stats = cls(len(mu), meta)
        stats.count = None
        stats._moments = (mu, sigma)
        return stats

    def __repr__(self):
        return f"FeatureStats(dims={self.dims}, count={self.count}, meta={self.meta})"


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
