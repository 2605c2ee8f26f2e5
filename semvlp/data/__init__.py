"""Image-text data: the embedded world generator, loaders of the public formats, the pre-training corpus."""
