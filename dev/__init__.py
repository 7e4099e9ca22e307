"""Development scripts and the log of experiments (dev/LOG.md); run from the repository root."""
