"""Build Mixture-of-Experts checkpoints from dense models in bounded memory."""

__version__ = "0.1.0"
