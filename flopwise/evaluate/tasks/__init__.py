"""Downstream tasks scored by log-likelihood or generation: their format (spec), the model calls they need
(scoring), their metrics, the engine, and the tasks built from a run's own held-out text (builtin)."""
