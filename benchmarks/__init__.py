"""Benchmarks of expunge's unlearning methods on public unlearning benchmarks (run via `expunge benchmark ...`)."""
