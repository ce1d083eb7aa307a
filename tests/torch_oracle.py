"""Bridges between pyincept's NHWC/HWIO arrays and torch's NCHW/OIHW tensors, for tests only."""

import numpy as np
import torch


def to_nchw(x, dtype=np.float32):
    # Into a tensor torch made itself, so it has plain NCHW strides. With C=1 every stride
    # pattern is "contiguous", and a NumPy or `.permute().contiguous()` copy can carry
    # strides that also look channels-last; torch 2.14.1's CPU F.conv2d then took another
    # path and returned wrong numbers, even 1e26-sized garbage, for a 3x3 filter at stride
    # (1, 2) on a 2x1x4x3 input (found by Hypothesis, checked by hand against the sum).
    x = np.asarray(x, dtype=dtype)
    t = torch.empty((x.shape[0], x.shape[3], x.shape[1], x.shape[2]), dtype=torch.from_numpy(x[:0]).dtype)
    t.copy_(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2))
    return t


def to_nhwc(t):
    return t.detach().permute(0, 2, 3, 1).contiguous().numpy()


def hwio_to_oihw(w):
    return torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))


def state_dict_numpy(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def randomise_batchnorm(module, generator):
    """Random affine parameters and running statistics in every BatchNorm2d, so folding is really tested."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                K = bn.num_features
                bn.weight.copy_(torch.rand(K, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(K, generator=generator) * 0.2)
                bn.running_mean.copy_(torch.randn(K, generator=generator) * 0.2)
                bn.running_var.copy_(torch.rand(K, generator=generator) + 0.5)
