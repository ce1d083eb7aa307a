"""Shared fixtures: a torchvision Inception v3 with realistic batch-norm statistics, and
its checkpoint saved by torch in both formats and converted the way users convert.

Random init alone gives logits around 1e12, which would make any comparison vacuous.
So the BN running statistics are calibrated on the shipped photographs: a train-mode
forward pass with momentum=None (a cumulative average) makes every running mean and
variance the real statistics of real images, and every layer works at O(1).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from photos import photo_batch
from torch_oracle import to_nchw

TESTS = Path(__file__).parent


def calibrate_batchnorm(model, x, seed=0):
    """Random BN affine parameters, then running statistics measured on x (NHWC) and its
    mirror image by one train-mode pass with momentum=None (a cumulative average). Returns
    the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    x = np.concatenate([x, x[:, :, ::-1]])                      # photos and their mirror images
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                K = bn.num_features
                bn.weight.copy_(torch.rand(K, generator=generator) + 0.5)   # random affine parameters
                bn.bias.copy_(torch.randn(K, generator=generator) * 0.2)
                bn.reset_running_stats()
                bn.momentum = None                                  # cumulative average
        model.train()
        model(to_nchw(np.ascontiguousarray(x)))
    return model.eval()


def calibrated_inception_v3(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=True)
    return calibrate_batchnorm(model, photo_batch(), seed)


@pytest.fixture(scope="session")
def tv_inception():
    """torchvision Inception v3 (eval mode, transform_input=False) with calibrated BN statistics."""
    return calibrated_inception_v3()


def run_cli(*args, env=None, check=False):
    """Run the real `pyincept` entry point in a subprocess."""
    result = subprocess.run([sys.executable, "-m", "pyincept", *map(str, args)], capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="session")
def checkpoints(tv_inception, tmp_path_factory):
    """{'zip': .pth, 'legacy': .pth} saved by torch.save from the calibrated model."""
    folder = tmp_path_factory.mktemp("checkpoints")
    state = tv_inception.state_dict()
    paths = {"zip": folder / "inception_v3_zip.pth", "legacy": folder / "inception_v3_legacy.pth"}
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    return paths


@pytest.fixture(scope="session")
def converted(checkpoints):
    """{'zip': .npz, 'legacy': .npz} converted through `pyincept convert`, the path users take."""
    out = {}
    for fmt, src in checkpoints.items():
        dst = src.with_suffix(".npz")
        run_cli("convert", src, dst, check=True)
        out[fmt] = dst
    return out


@pytest.fixture(scope="session")
def fid_net():
    """pytorch-fid's FID network, random weights with BN calibrated on photographs (fid_oracle.py)."""
    from fid_oracle import pytorch_fid_network

    return pytorch_fid_network()


@pytest.fixture(scope="session")
def fid_pth(fid_net, tmp_path_factory):
    """Its state dict, saved by torch.save under pytorch-fid's published file name."""
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid_net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def fid_file(fid_pth):
    """The same, converted by `pyincept convert` as a user would."""
    dst = fid_pth.with_name("fid.npz")
    run_cli("convert", fid_pth, dst, check=True)
    return dst
