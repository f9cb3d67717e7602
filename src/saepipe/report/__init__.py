"""What a person reads: the terminal view of a feature, the run report (plots, run_summary.json, README.md) and
the static feature browser."""
