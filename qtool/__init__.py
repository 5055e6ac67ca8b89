"""qtool: post-training quantization of safetensors checkpoints."""

__version__ = "0.1.0"
