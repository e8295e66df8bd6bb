"""Capability benchmarks of a model the project wrote: lm-evaluation-harness tasks (the optional eval extra)."""
