from .api import linear_kl_loss

__all__ = ["linear_kl_loss"]
