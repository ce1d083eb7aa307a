"""Weights in and out: `checkpoint` reads torch's files without torch, `npz` is pyincept's own
format, `convert` turns the one into the other for any registered model, `fetch` downloads a
published checkpoint, checks its hash and converts it into the cache.

Nothing is imported here: `convert` and `fetch` sit above the model registry, which reads `npz`.
"""
