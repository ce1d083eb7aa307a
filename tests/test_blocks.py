"""Each Inception module against torchvision's own, with random weights and random BN statistics.

torchvision's module runs in eval mode (BN uses running statistics); pyincept's block
gets the same state dict through the converter's layout rule, folds BN, and must
produce the same NHWC output.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models import inception as tv

from pyincept import fusion, layers
from pyincept.models import inception_v3 as v3
from pyincept.kernels import reference as ref
from pyincept.io.npz import torch_to_pyincept
from strategies import seeds
from torch_oracle import hwio_to_oihw, randomise_batchnorm, state_dict_numpy, to_nchw, to_nhwc

# (pyincept block, torchvision module, extra constructor arguments drawn by Hypothesis)
MODULES = {
    "A": (v3.InceptionA, tv.InceptionA, lambda d: {"pool_features": d(st.integers(1, 12))}),
    "B": (v3.InceptionB, tv.InceptionB, lambda d: {}),
    "C": (v3.InceptionC, tv.InceptionC, lambda d: {"channels_7x7": d(st.integers(1, 24))}),
    "D": (v3.InceptionD, tv.InceptionD, lambda d: {}),
    "E": (v3.InceptionE, tv.InceptionE, lambda d: {}),
}


def build_pair(block_cls, tv_cls, name, in_channels, kwargs, seed, **tv_kwargs):
    """A torchvision module with random weights and BN stats, and the pyincept block loaded from it."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = tv_cls(in_channels, **kwargs, **tv_kwargs).eval()
    randomise_batchnorm(module, generator)
    state = {f"{name}.{k}": v for k, v in state_dict_numpy(module).items()}
    block = block_cls(name, in_channels, *kwargs.values(), *tv_kwargs.values())
    block.load(torch_to_pyincept(state))
    return module, block


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-1x1", "torchvision-order"])
@pytest.mark.parametrize("kind", sorted(MODULES))
@settings(max_examples=6, deadline=None)
@given(data=st.data(), seed=seeds)
def test_module_matches_torchvision(kind, fused, data, seed):
    block_cls, tv_cls, extra = MODULES[kind]
    kwargs = extra(data.draw)
    C = data.draw(st.sampled_from([3, 7, 32]), label="C")
    N = data.draw(st.integers(1, 2), label="N")
    H, W = data.draw(st.integers(3, 11), label="H"), data.draw(st.integers(3, 11), label="W")
    module, block = build_pair(block_cls, tv_cls, "Mixed_x", C, kwargs, seed % 2**31)
    fusion.fuse(block, fused)

    x = np.random.default_rng(seed).standard_normal((N, H, W, C)).astype(np.float32)
    with torch.no_grad():
        expected = to_nhwc(module(to_nchw(x)))
    taps = layers.Taps(["Mixed_x.branch_pool", "Mixed_x"])
    actual = block(x, taps)
    assert_close(actual, expected)
    np.testing.assert_array_equal(taps.outputs["Mixed_x"], actual)


@pytest.mark.parametrize("size", [(17, 17), (20, 23)])
def test_aux_head_matches_torchvision(size):
    module, block = build_pair(v3.InceptionAux, tv.InceptionAux, "AuxLogits", 768, {}, 5, num_classes=10)
    x = np.random.default_rng(5).standard_normal((2, *size, 768)).astype(np.float32)
    with torch.no_grad():
        expected = module(to_nchw(x)).numpy()
    assert_close(block(x, layers.Taps()), expected)


def test_named_branch_output_is_torchvisions_branch():
    """Mixed_5b.branch_pool (the blog post's 35x35x32 picture) is avgpool -> 1x1 conv -> BN -> ReLU."""
    module, block = build_pair(v3.InceptionA, tv.InceptionA, "Mixed_5b", 16, {"pool_features": 32}, 3)
    x = np.random.default_rng(3).standard_normal((1, 35, 35, 16)).astype(np.float32)
    taps = layers.Taps(["Mixed_5b.branch_pool", "Mixed_5b.branch3x3dbl_2"])
    block(x, taps)
    with torch.no_grad():
        xt = to_nchw(x)
        pool = module.branch_pool(F.avg_pool2d(xt, 3, 1, 1))
        dbl2 = module.branch3x3dbl_2(module.branch3x3dbl_1(xt))
    assert_close(taps.outputs["Mixed_5b.branch_pool"], to_nhwc(pool))
    assert_close(taps.outputs["Mixed_5b.branch3x3dbl_2"], to_nhwc(dbl2))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([(1, 1), (3, 3), (1, 7)]), seeds)
def test_fold_batchnorm_equals_conv_then_bn(C, K, kernel, seed):
    """conv (no bias) -> BN(eps=0.001) equals one conv with the folded weight and bias."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 9, 9, C)).astype(np.float32)
    w = rng.standard_normal((*kernel, C, K)).astype(np.float32)
    gamma, beta, mean = (rng.standard_normal(K).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.05, 3, K).astype(np.float32)
    padding = (kernel[0] // 2, kernel[1] // 2)

    with torch.no_grad():
        y = F.conv2d(to_nchw(x), hwio_to_oihw(w), padding=padding)
        y = F.batch_norm(y, *map(torch.from_numpy, (mean, var, gamma, beta)), eps=layers.BN_EPS)
    folded_w, folded_b = layers.fold_batchnorm(w, gamma, beta, mean, var)
    assert_close(ref.conv2d(x, folded_w, folded_b, 1, padding), to_nhwc(y))
    # ...and the unfolded reference path agrees too.
    assert_close(ref.batch_norm(ref.conv2d(x, w, None, 1, padding), gamma, beta, mean, var), to_nhwc(y))
