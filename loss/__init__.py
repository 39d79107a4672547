"""Training losses."""

from .unicl_loss import UniCLLoss

__all__ = ["UniCLLoss"]
