"""The family's plumbing: the registry, the backend contract, the fusion plan's rules, the
reference device, and the commands that take their model from the weight file."""

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import pyincept
from conftest import run_cli
from photos import photo_batch
from pyincept import fusion, kernels, layers
from pyincept.errors import PyinceptError, WeightsError
from pyincept.io.npz import load_weights, save_weights
from pyincept.kernels import reference
from pyincept.models import get_spec
from pyincept.models import inception_v3 as v3
from torch_oracle import to_nchw, to_nhwc

PACKAGE = Path(pyincept.__file__).parent


def test_models_lists_the_family_and_create_model_builds_each():
    assert pyincept.models() == ["googlenet", "inception_v3", "inception_v3_fid"]
    assert isinstance(pyincept.create_model("googlenet"), pyincept.GoogLeNet)
    assert isinstance(pyincept.create_model("inception_v3"), pyincept.Inception3)
    with pytest.raises(PyinceptError, match="unknown model 'resnet'; choose one of googlenet, inception_v3, inception_v3_fid"):
        pyincept.create_model("resnet")


def test_parameters_and_macs_are_torchvisions_published_figures():
    """`pyincept models` against the meta torchvision publishes with each weight set."""
    result = run_cli("models", check=True)
    published = {"googlenet": torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.meta,
                 "inception_v3": torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.meta}
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:]}
    assert set(rows) == set(published) | {"inception_v3_fid"}
    assert "pt_inception-2015-12-05-6726825d.pth" in rows["inception_v3_fid"]
    for name, meta in published.items():
        spec = get_spec(name)
        assert f"{meta['_ops']:.2f}" in rows[name] and spec.default_weights.filename in rows[name]
        assert tuple(meta["min_size"]) == spec.min_size
    from pyincept.summary import layer_table, totals
    assert totals(layer_table(model="googlenet"))["params"] == published["googlenet"]["num_params"]
    assert totals(layer_table(model="inception_v3", include_aux=True))["params"] == published["inception_v3"]["num_params"]


def test_a_weight_file_names_its_model_and_old_files_are_recognised(tmp_path):
    params = pyincept.Inception3().random_parameters(1)
    save_weights(tmp_path / "old.npz", params, meta={})                    # written before the registry: no "model"
    assert isinstance(pyincept.load_model(tmp_path / "old.npz"), pyincept.Inception3)
    with pytest.raises(WeightsError, match="holds inception_v3 weights, not googlenet"):
        pyincept.googlenet(tmp_path / "old.npz")
    bad = dict(params)
    bad["fc.weight"] = np.zeros((2048, 10), np.float32)
    del bad["Mixed_7c.branch_pool.bn.bias"]
    with pytest.raises(WeightsError, match=r"nearest is inception_v3: 1 missing key\(s\).*fc\.weight' has shape \(2048, 10\)"):
        pyincept.detect_model(bad)


def test_every_backend_provides_the_whole_contract():
    from pyincept.kernels import cuda

    for module in (kernels, reference, cuda):
        assert kernels.missing_from_contract(module) == [], module.__name__
    assert (kernels.HAS_WINOGRAD, reference.HAS_WINOGRAD, cuda.HAS_WINOGRAD) == (True, True, False)
    assert kernels.backend("reference") is reference
    with pytest.raises(PyinceptError, match="unknown device 'tpu'"):
        kernels.backend("tpu")


def test_no_module_hard_codes_numba_flags_and_model_code_never_imports_numba():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("njit", "jit"):
                assert all(k.arg is None for k in node.keywords), f"{path.name}: flags belong in config.py"
        if path.parent.name != "kernels":
            imported = {n.names[0].name for n in ast.walk(tree) if isinstance(n, ast.Import)}
            imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not any(m.split(".")[0] == "numba" for m in imported), path


def test_importing_any_module_first_has_no_cycle():
    """Each module imported first, in a fresh interpreter: a cycle would fail for one of them."""
    import subprocess

    names = sorted({".".join(("pyincept", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                    for p in PACKAGE.rglob("*.py") if p.name != "__main__.py" and p.name != "cuda.py"})
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for name in names:
        subprocess.run([sys.executable, "-c", code, name], check=True)


class FidStyleA(v3.InceptionA):
    """The FID network's InceptionA: its pool branch does not count the padding."""

    @staticmethod
    def pool(kernel_size, stride=None, padding=0):
        return layers.avg_pool(kernel_size, stride, padding, count_include_pad=False)


def test_fusion_pools_after_the_1x1_even_without_counting_the_padding():
    """W @ avgpool(x) = avgpool(W @ x) holds for count_include_pad=False too: the divisor is per
    pixel, the same for every channel. Fused, unfused and torch agree on the pool branch."""
    rng = np.random.default_rng(3)
    block = FidStyleA("Mixed_x", 8, pool_features=5)
    params = {}
    for key, shape in block.parameter_shapes().items():
        params[key] = (rng.uniform(0.5, 1.5, shape) if key.endswith(("bn.weight", "bn.running_var"))
                       else rng.standard_normal(shape) * 0.3).astype(np.float32)
    block.load(params)
    x = rng.standard_normal((2, 6, 7, 8)).astype(np.float32)
    plain_taps = layers.Taps(["Mixed_x.branch_pool"])
    plain = block(x, plain_taps)
    plan = fusion.fuse(block, True)
    assert plan.pooled[1] is block.branch_pool and plan.refused == {}
    fused_taps = layers.Taps(["Mixed_x.branch_pool"])
    fused = block(x, fused_taps)
    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())
    w, b = block.branch_pool.folded
    with torch.no_grad():
        pooled = F.avg_pool2d(to_nchw(x), 3, 1, 1, count_include_pad=False)
        expected = F.relu(F.conv2d(pooled, torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), torch.from_numpy(b)))
    np.testing.assert_allclose(fused_taps.outputs["Mixed_x.branch_pool"], to_nhwc(expected), rtol=1e-5, atol=1e-5)


def test_reference_device_runs_inception_v3_like_the_fast_path():
    x = photo_batch((139, 139))[:1]
    fast = pyincept.inception_v3(seed=2).run(x, ["fc", "Mixed_5b.branch_pool"])
    slow = pyincept.inception_v3(seed=2, device="reference").run(x, ["fc", "Mixed_5b.branch_pool"])
    for name in fast:
        assert np.abs(slow[name] - fast[name]).max() <= 1e-4 * np.abs(fast[name]).max(), name


def test_commands_take_the_model_from_the_weight_file(tmp_path):
    path = tmp_path / "g.npz"
    model = pyincept.googlenet(seed=4)
    save_weights(path, model.random_parameters(4), meta={"model": "googlenet"})
    layers_out = run_cli("layers", "--weights", path, check=True).stdout
    assert "inception4e.branch3.1" in layers_out and "Mixed_5b" not in layers_out
    image = tmp_path / "photo.png"
    from PIL import Image
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
    grid = run_cli("activations", image, "--layer", "inception3a.branch4.0", "--weights", path, "--out", tmp_path / "g.png", check=True)
    assert "inception3a.branch4.0 (28x28x192)" in grid.stdout
    mismatch = run_cli("classify", image, "--weights", path, "--model", "inception_v3", "--quiet")
    assert mismatch.returncode == 1 and "holds googlenet weights, not inception_v3" in mismatch.stderr
    random = run_cli("layers", "--model", "googlenet", "--size", "100", "100", check=True).stdout
    assert "inception5b" in random


def test_the_2015_graphs_names_are_aliases_on_both_v3_models(tmp_path):
    """`mixed/tower_2/conv` (the seed's 35x35x32 tensor) is Mixed_5b.branch_pool, `mixed_10` Mixed_7c,
    `pool_3` the 2048-d pool, with or without ":0"; `softmax` the logits through softmax."""
    x = photo_batch((160, 160))[:2]
    for name in ("inception_v3", "inception_v3_fid"):
        model = pyincept.create_model(name, seed=3)
        out = model.run(x, ["mixed/tower_2/conv:0", "mixed/tower_2/conv", "mixed_10", "mixed_7/join", "pool_3",
                            "softmax", "Mixed_5b.branch_pool", "Mixed_7c", "Mixed_6e", "avgpool", "fc"])
        for alias, layer in (("mixed/tower_2/conv:0", "Mixed_5b.branch_pool"), ("mixed/tower_2/conv", "Mixed_5b.branch_pool"),
                             ("mixed_10", "Mixed_7c"), ("mixed_7/join", "Mixed_6e"), ("pool_3", "avgpool")):
            np.testing.assert_array_equal(out[alias], out[layer])
        z = out["fc"].astype(np.float64)
        expected = np.exp(z - z.max(1, keepdims=True))
        np.testing.assert_allclose(out["softmax"], expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
        with pytest.raises(PyinceptError, match="unknown layer 'mixed_11'"):
            model.run(x, ["mixed_11"])
    table = run_cli("layers", "--model", "inception_v3_fid", check=True).stdout
    assert "Mixed_5b.branch_pool (mixed/tower_2/conv)" in table and "Mixed_7c (mixed_10)" in table
    assert "avgpool (pool_3)" in table and "Mixed_6e (mixed_7)" in table
    from PIL import Image
    image = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((90, 90, 3)) * 255).astype(np.uint8)).save(image)
    grids = []
    for layer in ("mixed/tower_2/conv", "Mixed_5b.branch_pool"):
        run_cli("activations", image, "--layer", layer, "--weights", "random", "--out", tmp_path / f"{len(grids)}.png",
                "--cols", "4", "--pad", "0", check=True)
        grids.append(np.asarray(Image.open(tmp_path / f"{len(grids)}.png")))
    np.testing.assert_array_equal(grids[0], grids[1])
    assert grids[0].shape[:2] == (8 * 35, 4 * 35)                              # the seed's 8 x 4 grid at 299x299
