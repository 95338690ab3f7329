"""Training: the one update path, the compiled step, evaluation, data parallelism."""
