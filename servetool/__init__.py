"""servetool: turn a trained PyTorch model into a TorchServe inference service."""

__version__ = "0.1.0"
