"""The Fréchet distance between two Gaussians fitted to features (Heusel et al. 2017, FID):

    FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)

tr sqrt(S1 S2) is the sum of the square roots of S1 S2's eigenvalues. S1 S2 is not
symmetric, and the tools that take its matrix square root (pytorch-fid and clean-fid, with
scipy's `sqrtm`) get complex rounding noise back and fail with "Imaginary component", or NaN,
and take about 15 s at 2048 dims. But with S1 = L L^T (Cholesky), S1 S2 = L (L^T S2 L) L^-1
has the eigenvalues of the symmetric positive semi-definite L^T S2 L, which LAPACK finds
(`dsygv`, the generalized problem S2 S1 x = lambda x) as real numbers, in well under a second.
Rounding can leave the smallest a hair below zero; they are clipped to zero, so the square
roots are always real.

When S1 is singular (fewer images than dims), Cholesky fails; S2 takes its place
(tr sqrt(S1 S2) = tr sqrt(S2 S1)), and if both are singular, S1's eigendecomposition
V diag(w) V^T gives L = V diag(sqrt w) instead: slower, the same value.
`frechet_distance_sqrtm` is the textbook formula, the slow twin tests compare against.
"""

import warnings

import numpy as np
import scipy.linalg

from ..errors import PyinceptError


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID between (mu1, sigma1) and (mu2, sigma2): D vectors and D x D covariances, float64."""
    mu1, mu2, sigma1, sigma2 = _check(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(S1 S2) for symmetric positive semi-definite S1 and S2, as a real number."""
    for a, b in ((sigma2, sigma1), (sigma1, sigma2)):
        try:    # eigenvalues of L^T a L with b = L L^T (dsygv, itype 2: a b x = lambda x)
            eigenvalues = scipy.linalg.eigh(a, b, type=2, eigvals_only=True, driver="gv", check_finite=False)
            break
        except np.linalg.LinAlgError:            # b is not positive definite
            continue
    else:
        w, V = np.linalg.eigh(sigma1)
        half = V * np.sqrt(np.clip(w, 0, None))                     # S1 = half half^T
        eigenvalues = np.linalg.eigvalsh(half.T @ sigma2 @ half)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2):
    """The textbook formula with scipy's matrix square root of S1 S2 (its real part): slow,
    and for the tests only."""
    mu1, mu2, sigma1, sigma2 = _check(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def _check(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise PyinceptError(f"statistics of different dims: {mu1.shape[-1]} and {mu2.shape[-1]} "
                            "(compute both with the same --dims)")
    D = len(mu1)
    if sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise PyinceptError(f"covariances {sigma1.shape} and {sigma2.shape} do not fit {D}-d means")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(a)):
            raise PyinceptError(f"{name} has NaN or infinite values")
    return mu1, mu2, sigma1, sigma2


def warn_if_few(count, dims, which):
    """FID from fewer images than dims has a singular covariance and a large bias: say so."""
    if count is not None and count < dims:
        warnings.warn(f"{which} has {count} image(s) for {dims}-d features: its covariance is singular and "
                      f"the FID is biased upwards (use at least {dims} images; papers use 10000-50000)",
                      stacklevel=3)
