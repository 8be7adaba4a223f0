"""Small building blocks of the SAM 2 components: the multi-layer perceptron with Meta's key names
(``layers.0``, ``layers.1``, ...), used by Hiera's blocks, the mask decoder's heads and the model's
object-pointer projection."""

from __future__ import annotations

from typing import Type

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``num_layers`` linear layers with `activation` between them: (..., input_dim) -> (..., output_dim).

    With ``sigmoid_output`` the result goes through a sigmoid (the IoU head of SAM 2.1).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: Type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        widths_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        widths_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(widths_in, widths_out))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
