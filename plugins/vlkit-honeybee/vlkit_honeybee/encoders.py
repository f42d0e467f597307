"""A tiny random-init CNN encoder, to demonstrate the encoder side of the plugin contract (no pretrained weights)."""
from __future__ import annotations

import torch
from torch import nn

from vlkit import EncoderOutput

NAME = "tiny_cnn"


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1), nn.GroupNorm(1, out_ch), nn.GELU())


class TinyCNN(nn.Module):
    """Three stride-2 conv blocks (stride 8 overall): [B, 3, H, W] -> patches [B, (H/8)*(W/8), width]."""

    has_cls = False
    stride = 8

    def __init__(self, width: int = 64, image_size: int = 64) -> None:
        super().__init__()
        if width < 2:
            raise ValueError(f"encoder '{NAME}': width must be >= 2, got {width}")
        if image_size < self.stride or image_size % self.stride:
            raise ValueError(f"encoder '{NAME}': image_size must be a positive multiple of {self.stride}, got {image_size}")
        self.embed_dim = width
        self.image_size = image_size
        self.mean = (0.485, 0.456, 0.406)
        self.std = (0.229, 0.224, 0.225)
        self.net = nn.Sequential(_block(3, width // 2), _block(width // 2, width), _block(width, width))

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:  # [B, 3, H, W] -> patches [B, h*w, D], cls [B, D]
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"encoder '{NAME}': expected pixel_values [B, 3, H, W], got {tuple(pixel_values.shape)}")
        fmap = self.net(pixel_values)  # [B, D, h, w]
        h, w = fmap.shape[-2:]
        patches = fmap.flatten(2).transpose(1, 2)  # [B, h*w, D]
        return EncoderOutput(patches=patches, cls=fmap.mean(dim=(2, 3)), grid=(int(h), int(w)))


def tiny_cnn(width: int = 64, image_size: int = 64) -> TinyCNN:
    """vlkit encoder factory ``tiny_cnn``: random init, ``embed_dim == width``, grid ``image_size/8`` per side."""
    return TinyCNN(width=width, image_size=image_size)
