"""GoogLeNet (Inception v1) against torchvision's, on real photographs, through the converter users run.

Bar (issue 14): max |delta logit| <= 1e-3 of the largest |logit| and identical top-5, at
224x224 and at another size, from checkpoints saved in torch's zip and legacy formats;
the aux heads and named layers against torchvision's modules; `classify` with the
published recipe (transform_input included) against torchvision's own transforms.
"""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import pyincept
from conftest import calibrate_batchnorm, run_cli
from photos import PHOTOS, photo_batch
from pyincept import fusion
from pyincept.errors import PyinceptError
from pyincept.io.npz import load_weights
from test_network import assert_within_bar, torchvision_logits
from torch_oracle import to_nchw, to_nhwc

SIZES = [(224, 224), (256, 320)]


def calibrated_googlenet(seed=0, aux_logits=True):
    """torchvision's GoogLeNet with random weights and BN statistics measured on the photographs."""
    torch.manual_seed(seed)
    model = torchvision.models.googlenet(weights=None, aux_logits=aux_logits, transform_input=False, init_weights=True)
    return calibrate_batchnorm(model, photo_batch((224, 224)), seed)


@pytest.fixture(scope="module")
def tv_googlenet():
    return calibrated_googlenet()


@pytest.fixture(scope="module")
def googlenet_files(tv_googlenet, tmp_path_factory):
    """{'zip': .npz, 'legacy': .npz}: torch.save in both formats, then `pyincept convert` (no --model)."""
    folder = tmp_path_factory.mktemp("googlenet")
    out = {}
    for fmt in ("zip", "legacy"):
        src = folder / f"googlenet_{fmt}.pth"
        torch.save(tv_googlenet.state_dict(), src, _use_new_zipfile_serialization=fmt == "zip")
        dst = src.with_suffix(".npz")
        run_cli("convert", src, dst, check=True)
        out[fmt] = dst
    return out


def test_parameter_table_is_torchvisions_state_dict(tv_googlenet):
    torch_shapes = {k: tuple(v.shape) for k, v in tv_googlenet.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = pyincept.GoogLeNet().parameter_shapes()
    assert set(ours) == set(torch_shapes)
    for key, shape in torch_shapes.items():
        expected = {4: lambda s: (s[2], s[3], s[1], s[0]), 2: lambda s: (s[1], s[0])}.get(len(shape), lambda s: s)(shape)
        assert ours[key] == expected, key


def test_converter_recognises_googlenet_and_records_it(googlenet_files):
    params, meta = load_weights(googlenet_files["zip"])
    assert meta["model"] == "googlenet"
    assert meta["preprocessing"] == {"resize_size": 256, "crop_size": 224, "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225], "transform_input": True}
    assert pyincept.detect_model(params) == "googlenet"
    assert isinstance(pyincept.load_model(googlenet_files["zip"]), pyincept.GoogLeNet)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_converted_checkpoint_reproduces_torchvision_logits(tv_googlenet, googlenet_files, fmt, size):
    x = photo_batch(size)
    model = pyincept.load_model(googlenet_files[fmt])
    assert model.algorithm == "winograd" and any(layer.winograd is not None for layer in model.conv_layers())
    assert_within_bar(model(x), torchvision_logits(tv_googlenet, x))


def test_im2col_unfused_and_smallest_input_meet_the_bar_too(tv_googlenet, googlenet_files):
    x = photo_batch()[:, :224, :224]
    expected = torchvision_logits(tv_googlenet, x)
    assert_within_bar(pyincept.googlenet(googlenet_files["zip"], algorithm="im2col")(x), expected)
    assert_within_bar(pyincept.googlenet(googlenet_files["zip"], fuse=False)(x), expected)
    small = photo_batch((15, 15))
    assert_within_bar(pyincept.googlenet(googlenet_files["zip"])(small), torchvision_logits(tv_googlenet, small))
    with pytest.raises(PyinceptError, match="GoogLeNet needs at least 15x15"):
        pyincept.googlenet(googlenet_files["zip"])(np.zeros((1, 14, 30, 3), np.float32))


def test_aux_heads_and_named_layers_match_torchvision(tv_googlenet, googlenet_files):
    x = photo_batch((224, 224))[:2]
    names = ["conv1", "maxpool1", "inception3a.branch4.0", "inception3a.branch4.1", "inception3a.branch3.1",
             "inception4a", "inception4d", "maxpool4", "inception5b", "avgpool"]
    captured = {}
    hooks = [tv_googlenet.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in names]
    try:
        with torch.no_grad():
            logits = tv_googlenet(to_nchw(x))
            aux1, aux2 = tv_googlenet.aux1(captured["inception4a"]), tv_googlenet.aux2(captured["inception4d"])
    finally:
        for h in hooks:
            h.remove()
    out = pyincept.googlenet(googlenet_files["zip"]).run(x, names + ["aux1", "aux2", "aux1.fc1", "fc"])
    assert out["inception3a.branch4.1"].shape == (2, 28, 28, 32)
    for name in names:
        expected = to_nhwc(captured[name])
        np.testing.assert_allclose(out[name], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max(), err_msg=name)
    assert out["aux1.fc1"].shape == (2, 1024) and out["aux1.fc1"].min() >= 0          # fc1 then ReLU
    assert_within_bar(out["aux1"], aux1.numpy())
    assert_within_bar(out["aux2"], aux2.numpy())
    assert_within_bar(out["fc"], logits.numpy())


def test_a_state_dict_without_aux_heads_loads_without_them(tmp_path):
    tv = calibrated_googlenet(aux_logits=False)
    src = tmp_path / "no_aux.pth"
    torch.save(tv.state_dict(), src)
    run_cli("convert", src, tmp_path / "no_aux.npz", check=True)
    model = pyincept.load_model(tmp_path / "no_aux.npz")
    assert "aux1" not in model.layer_names() and not hasattr(model, "aux1")
    x = photo_batch((224, 224))[:2]
    assert_within_bar(model(x), torchvision_logits(tv, x))
    with pytest.raises(PyinceptError, match="unknown layer 'aux1'"):
        model.run(x, ["aux1"])


def test_fusion_refuses_the_max_pool_branch_and_fuses_the_rest():
    model = pyincept.googlenet()
    block = model.inception3a
    plan = block.plan
    assert [conv.name for _, conv in plan.members] == ["inception3a.branch1", "inception3a.branch2.0", "inception3a.branch3.0"]
    assert plan.pooled is None
    assert "max" in plan.refused["inception3a.branch4.1"]
    with pytest.raises(PyinceptError, match="through the network, which reloads them"):
        fusion.fuse(block, False)                          # its filters are packed only: the network reloads them
    assert model.set_fuse(False) is model and block.plan is None
    with pytest.raises(PyinceptError, match="through the network, which reloads them"):
        fusion.fuse(block, True)                           # the members' filters are packed on their own now
    assert block.plan is None and not any(conv.fused for conv in block.layers())
    assert model.set_fuse(True).inception3a.plan is not None


def test_reference_device_agrees_with_the_fast_path(googlenet_files):
    x = photo_batch((224, 224))[:1]
    fast = pyincept.load_model(googlenet_files["zip"]).run(x, ["fc", "aux2"])
    slow_model = pyincept.load_model(googlenet_files["zip"], device="reference")
    assert slow_model.device == "reference"
    slow = slow_model.run(x, ["fc", "aux2"])
    for name in ("fc", "aux2"):
        rel = np.abs(slow[name] - fast[name]).max() / np.abs(fast[name]).max()
        assert rel <= 1e-4, (name, rel)


@pytest.mark.slow
def test_classify_with_the_published_recipe_gives_torchvisions_top5(tv_googlenet, googlenet_files):
    """`pyincept classify --weights googlenet.npz`: resize 256, crop 224 and transform_input,
    against torchvision's own transforms and its transform_input=True network."""
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    tv.load_state_dict(tv_googlenet.state_dict())
    tv.eval()
    transforms = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        batch = torch.stack([transforms(Image.open(p).convert("RGB")) for p in PHOTOS])
        probabilities = torch.softmax(tv(batch), dim=1).numpy()
    result = run_cli("classify", *PHOTOS, "--weights", googlenet_files["zip"], "--json", "--quiet", check=True)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["path"] for a in answers] == [str(p) for p in PHOTOS]
    for answer, p in zip(answers, probabilities):
        assert [t["index"] for t in answer["top"]] == list(np.argsort(-p, kind="stable")[:5])
        np.testing.assert_allclose([t["probability"] for t in answer["top"]], np.sort(p)[::-1][:5], rtol=1e-3, atol=1e-6)
