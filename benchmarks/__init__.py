"""nanoseek benchmarks: one question per script, run from the repository root as
`python -m benchmarks.bench_x` (benchmarks/RESULTS.md holds the measured numbers)."""
