"""What a person reads: the terminal view of a feature (and, later, plots, the run report and the browser)."""
