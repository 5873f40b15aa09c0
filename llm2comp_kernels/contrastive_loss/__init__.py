from .api import contrastive_loss

__all__ = ["contrastive_loss"]
