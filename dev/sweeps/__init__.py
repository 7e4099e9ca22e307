"""Recipe sweeps on many-core CPU hosts, run from the repository root:

    python -m dev.sweeps.sweep_rl ...       GRPO variants over seeds, chosen on val, reported on test
    python -m dev.sweeps.rl_variant ...     one GRPO run from a pretrained checkpoint (sweep_rl's job)
    python -m dev.sweeps.collect_sweep ...  one JSON file and one log digest from a sweep's folder

dev/LOG.md and benchmarks/RESULTS.md hold what they measured.
"""
