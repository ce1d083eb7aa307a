"""pyincept's benchmark suite (`python -m benchmarks`)."""
