"""Evaluation: the protocol (lambda on validation, test once), fused decoding and its caches,
diagnostics, answer scoring, predictions, statistics, report and plots; loading a finished run."""
