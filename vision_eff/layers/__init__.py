"""Drop-in layer-level accelerations that keep a model's maths (one idea per file)."""
from .chunked_feed_forward import ChunkedFeedForward

__all__ = ["ChunkedFeedForward"]
