"""Dataset readers for real on-disk formats, the synthetic generator, transforms, DataModule."""
