"""Our im2col convolution against F.conv2d: values and every gradient, over a grid of settings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vptlab.models.custom_conv import CustomConv2d, conv2d

SETTINGS = [
    # kernel, stride, padding, dilation
    ((3, 3), 1, 0, 1),
    ((3, 3), 1, 1, 1),
    ((3, 3), 2, 1, 1),
    ((1, 1), 1, 0, 1),
    ((7, 7), 2, 3, 1),
    ((3, 3), 1, 2, 2),
    ((2, 3), (2, 1), (0, 1), 1),
    ((3, 5), 1, (1, 2), (2, 1)),
    ((5, 2), (1, 3), (2, 0), (1, 2)),
]


@pytest.mark.parametrize("kernel,stride,padding,dilation", SETTINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_matches_torch(kernel, stride, padding, dilation, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    ours = conv2d(x, w, b, stride, padding, dilation)
    ref = F.conv2d(x, w, b, stride, padding, dilation)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref)

    upstream = torch.randn_like(ref)
    inputs = [x, w] + ([b] if bias else [])
    grads = torch.autograd.grad(ours, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, inputs, upstream)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_custom_conv_module_is_a_drop_in_for_nn_conv2d():
    torch.manual_seed(0)
    reference = nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2))
    ours = CustomConv2d(3, 8, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2))
    ours.load_state_dict(reference.state_dict())  # same parameter names and shapes
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    assert CustomConv2d(3, 8, 3, bias=False).bias is None


def test_conv2d_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="channels"):
        conv2d(torch.rand(1, 2, 8, 8), torch.rand(4, 3, 3, 3))
