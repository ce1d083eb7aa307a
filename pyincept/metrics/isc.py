"""Inception Score (Salimans et al. 2016), exactly as torch-fidelity 0.4.0 computes it (`metric_isc.py`):

    IS = exp( mean over images of KL( p(y|x) || p(y) ) ),   p(y) the split's mean of p(y|x)

* p(y|x) is the softmax over all 1008 classes of `logits_unbiased` (the fc without its bias),
  in float64;
* the images are shuffled by `np.random.RandomState(seed).permutation(N)`, then cut into
  `splits` parts, part i being rows i N // splits to (i + 1) N // splits;
* report the mean and the (population) standard deviation of the parts' scores.
"""

import numpy as np

from ..errors import PyinceptError

SPLITS = 10
SEED = 2020


def log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def inception_score(logits, splits=SPLITS, seed=SEED, shuffle=True):
    """{"inception_score_mean", "inception_score_std"} for (N, classes) logits."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise PyinceptError(f"IS needs (N, classes) logits, got shape {logits.shape}")
    N = len(logits)
    if splits < 1 or N < splits:
        raise PyinceptError(f"IS in {splits} split(s) needs at least that many images, got {N} (pass a smaller --isc-splits)")
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(N)]
    log_p = log_softmax(logits)                                        # (N, classes)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        part = slice(i * N // splits, (i + 1) * N // splits)
        log_q = np.log(p[part].mean(axis=0, keepdims=True))            # log p(y) of the split
        kl = (p[part] * (log_p[part] - log_q)).sum(axis=1)             # KL per image
        scores.append(np.exp(kl.mean()))
    return {"inception_score_mean": float(np.mean(scores)), "inception_score_std": float(np.std(scores))}
