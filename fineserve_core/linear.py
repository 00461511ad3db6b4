"""The linear-layer seam: one factory builds every projection for a precision."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseLinear(nn.Module):
    """bf16 precision (W16A16): weights in the model dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def make_linear(precision: str, weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    if precision == "bf16":
        return DenseLinear(weight, dtype)
    raise ValueError(f"precision {precision!r} has no linear layer yet")
