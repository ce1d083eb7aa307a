"""Kernel Inception Distance (Binkowski et al. 2018), exactly as torch-fidelity 0.4.0 computes it
(`metric_kid.py`, from the authors' MMD-GAN code):

* `subsets` times, draw `subset_size` features of each set without replacement, from ONE
  `np.random.RandomState(seed)`, first set then second (so the same seed gives the same subsets);
* the polynomial kernel k(x, y) = (x.y / d + 1)^3;
* the unbiased estimate of MMD^2: the mean of k over distinct pairs within each set, minus
  twice the mean over all pairs across the sets;
* report the mean and the (population) standard deviation over the subsets.

Features are taken in float64 (torch-fidelity multiplies them in float32): the same
subsets, and the value without float32's rounding.
"""

import numpy as np

from ..errors import PyinceptError

SUBSETS = 100
SUBSET_SIZE = 1000
SEED = 2020


def polynomial_kernel(x, y, degree=3, coef0=1.0):
    """(x y^T / d + coef0) ^ degree, for (m, d) and (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(k_xx, k_xy, k_yy):
    """Unbiased MMD^2 from the three (m, m) kernel matrices (the diagonals of k_xx and k_yy left out)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(features1, features2, subsets=SUBSETS, subset_size=SUBSET_SIZE, seed=SEED):
    """{"kernel_inception_distance_mean", "kernel_inception_distance_std"} for (N1, D) and (N2, D) features."""
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise PyinceptError(f"KID needs features of the same dims, got {x.shape} and {y.shape}")
    if subsets < 1:
        raise PyinceptError(f"KID needs at least 1 subset, got {subsets}")
    if subset_size < 2:
        raise PyinceptError(f"KID needs subsets of at least 2 images, got {subset_size}")
    if len(x) < subset_size or len(y) < subset_size:
        raise PyinceptError(f"KID subsets of {subset_size} images need at least that many in each input "
                            f"(input 1: {len(x)}, input 2: {len(y)}); pass a smaller --kid-subset-size")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), subset_size, replace=False)]
        b = y[rng.choice(len(y), subset_size, replace=False)]
        mmds[i] = mmd2_unbiased(polynomial_kernel(a, a), polynomial_kernel(a, b), polynomial_kernel(b, b))
    return {"kernel_inception_distance_mean": float(mmds.mean()), "kernel_inception_distance_std": float(mmds.std())}
