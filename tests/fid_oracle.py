"""The FID tools as oracles, built offline on a random-weight FID network (BN calibrated on
photographs): pytorch-fid 0.3.0, torch-fidelity 0.4.0 and clean-fid 0.1.35, each run through
its own code path, with the network pyincept converts from the same state dict.

None of them can download here, so each is pointed at that network:
- pytorch-fid: `pytorch_fid.inception.fid_inception_v3` returns it (the function its
  `InceptionV3` and `calculate_fid_given_paths` call);
- torch-fidelity: its `feature_extractor_weights_path=` takes the saved state dict;
- clean-fid: its TorchScript file can't be made (NVIDIA's graph), so its "clean" pipeline
  (`get_files_features`, mode="clean") runs with `custom_feat_extractor`, the same network
  behind clean-fid's own (x - 128) / 128.
"""

import contextlib

import numpy as np
import pytest
import torch

from conftest import calibrate_batchnorm
from photos import photo_batch


def pytorch_fid_network(seed=0):
    """What pytorch_fid.inception.fid_inception_v3() builds, without its download."""
    pi = pytest.importorskip("pytorch_fid.inception")
    torch.manual_seed(seed)
    net = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=True)
    net.Mixed_5b = pi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pi.FIDInceptionE_1(1280)
    net.Mixed_7c = pi.FIDInceptionE_2(2048)
    x = photo_batch() * np.float32(0.45) + np.float32(0.0)        # roughly the [-1, 1] range FID feeds it
    return calibrate_batchnorm(net, x, seed)


@contextlib.contextmanager
def pytorch_fid_uses(net):
    """pytorch-fid's own code, with `net` where it would download the 2015 graph's weights."""
    import pytorch_fid.inception as pi

    original = pi.fid_inception_v3
    pi.fid_inception_v3 = lambda: net
    try:
        yield
    finally:
        pi.fid_inception_v3 = original


def pytorch_fid_activations(net, files, dims):
    """pytorch-fid's `get_activations` (its dataset, ToTensor, resize and scaling), (N, dims)."""
    import pytorch_fid.fid_score as fs
    from pytorch_fid.inception import InceptionV3

    with pytorch_fid_uses(net):
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()
    return fs.get_activations([str(f) for f in files], model, batch_size=1, dims=dims, device="cpu", num_workers=0)


def torch_fidelity_features(pth, files, names=("64", "192", "768", "2048", "logits_unbiased", "logits")):
    """torch-fidelity's InceptionV3 feature extractor on each image as its dataset gives it (uint8 CHW)."""
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3("inception-v3-compat", list(names), feature_extractor_weights_path=str(pth))
    dataset = ImagesPathDataset([str(f) for f in files])
    out = {n: [] for n in names}
    with torch.no_grad():
        for i in range(len(dataset)):
            for n, f in zip(names, extractor(dataset[i][None])):
                out[n].append(f.numpy())
    return {n: np.concatenate(v) for n, v in out.items()}


@contextlib.contextmanager
def clean_fid_extractor(net):
    """clean-fid's `InceptionV3W.forward` without its TorchScript file: (x - 128) / 128, then the
    network to its 2048-d pool. Takes clean-fid's resized [0, 255] NCHW float32 batches."""
    features = {}
    hook = net.avgpool.register_forward_hook(lambda m, i, o: features.__setitem__("pool", o))

    def model_fn(x):
        x1 = x - 128
        x2 = x1 / 128
        net(x2)
        return features["pool"].view(x.shape[0], 2048)

    try:
        yield model_fn
    finally:
        hook.remove()


def clean_fid_features(net, files):
    """clean-fid's `get_files_features` in mode "clean" (its dataset, resize and clip), (N, 2048)."""
    pytest.importorskip("cleanfid")
    from cleanfid.fid import get_files_features

    with clean_fid_extractor(net) as model_fn:
        return get_files_features([str(f) for f in files], model=model_fn, num_workers=0, batch_size=1,
                                  device=torch.device("cpu"), mode="clean", verbose=False)
