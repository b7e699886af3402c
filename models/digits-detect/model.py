"""DigitsDetector: a small single-stage, anchor-free detector in the YOLOv8 style, in plain PyTorch.

A strided convolutional backbone to one 16x16 grid (stride 8 on the 128x128 input), then two heads
per cell: the distances from the cell's centre to the box's four sides (softplus, in strides) and
one score per class (sigmoid). The output is YOLOv8's layout, [N, 4 + classes, anchors], with the
box as centre x, y, width, height in the input's pixels: servetool's `object-detection` task
decodes it as any YOLOv8 export.
"""

from __future__ import annotations

import torch
from torch import nn


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.SiLU())


class DigitsDetector(nn.Module):
    stride = 8
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv(3, 16, 2), conv(16, 32, 2), conv(32, 32),
                                      conv(32, 64, 2), conv(64, 64), conv(64, 64))
        self.box_head = nn.Sequential(conv(64, 64), nn.Conv2d(64, 4, 1))
        self.cls_head = nn.Sequential(conv(64, 64), nn.Conv2d(64, self.num_classes, 1))
        nn.init.constant_(self.cls_head[-1].bias, -4.0)  # start from "nothing here"

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x1 y1 x2 y2 [N, A, 4], class logits [N, A, classes], cell centres [A, 2])."""
        features = self.backbone(x)
        n, _, gh, gw = features.shape
        ys = (torch.arange(gh, dtype=x.dtype) + 0.5) * self.stride
        xs = (torch.arange(gw, dtype=x.dtype) + 0.5) * self.stride
        centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
        ltrb = nn.functional.softplus(self.box_head(features)).flatten(2).transpose(1, 2) * self.stride
        boxes = torch.cat([centres - ltrb[..., :2], centres + ltrb[..., 2:]], -1)
        logits = self.cls_head(features).flatten(2).transpose(1, 2)
        return boxes, logits, centres

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes, logits, _ = self.raw(x)
        xywh = torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)
        return torch.cat([xywh, logits.sigmoid()], -1).transpose(1, 2)
