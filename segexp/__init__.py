"""segexp: one codebase to train, evaluate, sweep and compare weakly-supervised and
class-agnostic segmentation methods."""

__version__ = "0.1.0"
