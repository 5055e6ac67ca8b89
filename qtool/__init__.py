"""qtool: post-training quantization of safetensors checkpoints."""

import sys

__version__ = "0.1.0"


def interrupted_message() -> str:
    """What a Ctrl-C says: whether the run's output had already been published. Looked up in
    sys.modules, not imported: at start-up nothing is loaded and nothing was written."""
    staging = sys.modules.get("qtool.pipeline.staging")
    published = getattr(staging, "PUBLISHED", None)
    if published:
        return f"interrupted; the output {published[-1]} had already been written and is complete"
    return "interrupted; no output was written"
