"""Small models that raise or misbehave on some inputs: for the handler's per-request isolation."""

import torch
from torch import nn


class EmbedNet(nn.Module):
    """int64 token ids -> 3 scores; an id outside [0, 10) makes the embedding lookup raise."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


class ExpNet(nn.Module):
    """float inputs -> x * exp(x): infinite for large inputs (an output JSON cannot carry)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(x * self.scale)


class DetectLikeNet(nn.Module):
    """An image in, a detector-shaped output out: [batch, 4 + 5 classes, 256 anchors]."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 9, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).flatten(2)


class MaskedMean(nn.Module):
    """Two named inputs with a dynamic `seq` axis (token ids and their attention mask), two outputs:
    the mask-weighted mean of the token states ([4]) and the states themselves ([seq, 4])."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        states = self.proj(self.embed(input_ids))
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return pooled, states
