"""SemVLP: vision-language pre-training with a shared single-/two-stream Transformer, as a workflow."""

__version__ = "0.1.0"
