from .api import memory_attention

__all__ = ["memory_attention"]
