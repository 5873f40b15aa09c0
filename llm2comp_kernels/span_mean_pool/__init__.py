from .api import span_mean_pool

__all__ = ["span_mean_pool"]
