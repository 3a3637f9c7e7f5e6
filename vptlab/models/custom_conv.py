"""A 2-D convolution written as im2col (`F.unfold`) plus one matmul, so the arithmetic is visible.

`CustomConv2d` is a drop-in for `nn.Conv2d` (same constructor, same parameter names, so state dicts
move between the two); autograd derives the backward pass from unfold and matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

IntOrPair = int | tuple[int, int]


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> torch.Tensor:
    """Same result as `F.conv2d(x, weight, bias, stride, padding, dilation)` for groups=1."""
    if x.ndim != 4:
        raise ValueError(f"conv2d expects a (B, C, H, W) input, got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    out_channels, in_channels, kh, kw = weight.shape
    if channels != in_channels:
        raise ValueError(
            f"conv2d: input has {channels} channels but the weight expects {in_channels}"
        )
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"conv2d: a {kh}x{kw} kernel (dilation {dilation}, padding {padding}) does not fit "
            f"a {height}x{width} input"
        )
    # columns: (B, C*kh*kw, L), one column per output position, ordered like weight.view(O, -1).
    columns = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    out = weight.reshape(out_channels, -1) @ columns  # (O, C*kh*kw) @ (B, C*kh*kw, L)
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(batch, out_channels, out_h, out_w)


class CustomConv2d(nn.Module):
    """`nn.Conv2d` (groups=1, zero padding) computed by `conv2d` above."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default init, so swapping the two changes nothing but the arithmetic.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}"
        )
