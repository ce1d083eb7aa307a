"""The whole network against torchvision, on real photographs, through the converter users run.

Bar (the core issue): max |delta logit| <= 1e-3 of the largest |logit|, and identical
top-5, at 299x299 and at a non-square size, for checkpoints saved in torch's zip
format and in its legacy format.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyincept
from photos import PHOTOS, photo_batch
from pyincept.errors import PyinceptError, WeightsError
from pyincept.io.npz import load_weights
from pyincept.kernels.gemm import Panels
from pyincept.models.inception_v3 import Inception3
from torch_oracle import to_nchw, to_nhwc

SIZES = [(299, 299), (311, 400)]


def torchvision_logits(model, x):
    with torch.no_grad():
        return model(to_nchw(x)).numpy()


def assert_within_bar(actual, expected):
    assert actual.shape == expected.shape
    # Calibrated logits are O(1) (the aux head's fc starts at std 0.001, so smaller);
    # uncalibrated ones are ~1e12, where a relative bar would prove nothing.
    assert 1e-3 < np.abs(expected).max() < 1e4, "oracle logits are degenerate; calibration failed"
    rel = np.abs(actual - expected).max() / np.abs(expected).max()
    assert rel <= 1e-3, f"max |delta logit| is {rel:.2e} of the largest logit"
    top5 = lambda z: np.argsort(-z, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(top5(actual), top5(expected))


def test_parameter_table_is_torchvisions_state_dict(tv_inception):
    """Every checkpoint key maps one to one, with the layout change as the only difference."""
    torch_shapes = {k: tuple(v.shape) for k, v in tv_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = Inception3().parameter_shapes()
    assert list(ours) == list(torch_shapes)
    for key, shape in torch_shapes.items():
        expected = {4: lambda s: (s[2], s[3], s[1], s[0]), 2: lambda s: (s[1], s[0])}.get(len(shape), lambda s: s)(shape)
        assert ours[key] == expected, key


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_converted_checkpoint_reproduces_torchvision_logits(tv_inception, converted, fmt, size):
    x = photo_batch(size)
    model = pyincept.inception_v3(converted[fmt])
    assert model.algorithm == "winograd"                       # the default
    assert_within_bar(model(x), torchvision_logits(tv_inception, x))


def test_im2col_and_winograd_agree_and_both_meet_the_bar(tv_inception, converted):
    """algorithm="im2col" (the readable path) vs "winograd" (the default for 3x3 stride-1 convs)."""
    x = photo_batch()
    expected = torchvision_logits(tv_inception, x)
    model = pyincept.inception_v3(converted["zip"], algorithm="im2col")
    assert all(layer.winograd is None for layer in model.conv_layers())
    im2col = model(x)
    assert_within_bar(im2col, expected)
    model.set_algorithm("winograd")
    used = {layer.name: len(layer.winograd) for layer in model.conv_layers() if layer.winograd is not None}
    assert list(used)[:3] == ["Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_4a_3x3"]
    assert used["Conv2d_2b_3x3"] == used["Conv2d_4a_3x3"] == 36             # F(4x4) up to C=256
    assert used["Mixed_7b.branch3x3dbl_2"] == 16                             # F(2x2) at C=448, 8x8
    assert used["Mixed_6b.branch7x7_2"] == used["Mixed_6e.branch7x7dbl_5"] == 10  # F(4, 7)
    assert used["Mixed_5b.branch5x5_2"] == used["Mixed_5d.branch5x5_2"] == 36     # F(2x2, 5x5)
    assert used["Mixed_7b.branch3x3_2a"] == used["Mixed_7c.branch3x3dbl_3b"] == 6  # F(4, 3)
    # Every stride-1 3x3 (12), every 1x7 / 7x1 (6 in each of Mixed_6b-e, 2 in Mixed_7a),
    # the padded 5x5s (Mixed_5b-d; not AuxLogits.conv1, one output pixel from a 5x5 map)
    # and every 1x3 / 3x1 (4 in each of Mixed_7b-c).
    assert len(used) == 12 + 6 * 4 + 2 + 3 + 4 * 2 and "AuxLogits.conv1" not in used
    winograd = model(x)
    assert_within_bar(winograd, expected)
    assert np.abs(winograd - im2col).max() <= 1e-4 * np.abs(im2col).max()
    with pytest.raises(PyinceptError, match="unknown algorithm 'fft'"):
        model.set_algorithm("fft")


def held_bytes(model):
    """Bytes of every distinct weight buffer the model's layers and fusion plans hold (the
    CPU's packed panels included)."""
    buffers = {}

    def hold(a):
        a = getattr(a, "data", a) if isinstance(a, Panels) else a
        if isinstance(a, np.ndarray):
            root = a
            while isinstance(root.base, np.ndarray):
                root = root.base
            buffers[id(root)] = root

    for layer in model.weighted_layers():
        for a in (*(getattr(layer, "folded", None) or getattr(layer, "host", None) or ()), layer.weight, layer.bias,
                  getattr(layer, "winograd", None)):
            hold(a)
    for part in model.parts():
        plan = getattr(part, "plan", None)
        if plan is not None:
            hold(plan.weight)
            hold(plan.host_weight)
    return sum(b.nbytes for b in buffers.values())


def test_each_weight_is_held_once_in_the_form_its_kernel_reads(converted):
    """Every conv keeps only the form its kernel reads, packed into the GEMM's panels: its
    Winograd filters, its own filters, or (a fused 1x1) its module's one matrix; no host
    filters beside them."""
    model = pyincept.inception_v3(converted["zip"])
    convs = [layer for layer in model.conv_layers() if layer.folded is not None]        # the aux head waits
    assert convs and all(layer.folded[0] is None for layer in convs)
    assert all(isinstance(layer.winograd or layer.weight, Panels) for layer in convs if not layer.fused)
    plans = [part.plan for part in model.parts() if getattr(part, "plan", None)]
    assert plans and all(plan.host_weight is None and isinstance(plan.weight, Panels) for plan in plans)
    assert all(conv.fused and conv.weight is None for plan in plans for _, conv in plan.convs())
    assert model.fc.host[0] is None and isinstance(model.fc.weight, Panels)    # the fc too
    full = Inception3()                                              # the same weights, handed in: no reload,
    params, _ = load_weights(converted["zip"])                       # so every host copy stays
    full.load_parameters(params)
    assert all(layer.folded[0] is not None for layer in full.conv_layers())
    assert held_bytes(model) < held_bytes(full) - 80 * 2**20


def test_fusion_switched_after_loading_reloads_the_filters_and_gives_the_same_bits(converted, tmp_path):
    """set_fuse on a model that holds packed forms only reads the file again for the plans."""
    x = photo_batch((299, 299))[:1]
    path = tmp_path / "v3.npz"
    path.write_bytes(converted["zip"].read_bytes())
    model = pyincept.inception_v3(path)
    fused = model(x)
    unfused = model.set_fuse(False)(x)                                      # pool branches: pool, then conv
    assert np.abs(unfused - fused).max() <= 1e-4 * np.abs(fused).max()
    np.testing.assert_array_equal(unfused, pyincept.inception_v3(path, fuse=False)(x))
    assert all(layer.folded[0] is None for layer in model.conv_layers() if layer.folded is not None)
    np.testing.assert_array_equal(model.set_fuse(True)(x), fused)


@pytest.mark.parametrize("device", ["im2col", "reference"])
def test_switching_after_loading_reloads_the_weights_and_gives_the_same_bits(converted, tmp_path, device):
    """set_algorithm and to() on a model that dropped its host filters read the file again:
    the same bits as a model built that way from the start. A file changed since is refused."""
    x = photo_batch((299, 299))[:1]
    path = tmp_path / "v3.npz"
    path.write_bytes(converted["zip"].read_bytes())
    model = pyincept.inception_v3(path)
    if device == "im2col":
        expected = pyincept.inception_v3(path, algorithm="im2col")(x)
        np.testing.assert_array_equal(model.set_algorithm("im2col")(x), expected)
        assert all(layer.winograd is None and (layer.fused or isinstance(layer.weight, Panels))
                   for layer in model.conv_layers() if layer.folded is not None)
        np.testing.assert_array_equal(model.set_algorithm("winograd")(x), pyincept.inception_v3(path)(x))
    else:
        expected = pyincept.inception_v3(path, device="reference")(x)
        np.testing.assert_array_equal(model.to("reference")(x), expected)
    model = pyincept.inception_v3(path)
    os.utime(path, ns=(0, 0))                                        # touched since: refused in one line
    with pytest.raises(WeightsError, match="changed since the model was loaded from it"):
        model.set_algorithm("im2col")


def test_random_init_reloads_from_its_seed_and_fusion_can_be_taken_off():
    x = np.random.default_rng(3).standard_normal((1, 160, 160, 3)).astype(np.float32)
    model = pyincept.inception_v3(seed=5)
    np.testing.assert_array_equal(model.set_algorithm("im2col")(x), pyincept.inception_v3(seed=5, algorithm="im2col")(x))
    model = pyincept.inception_v3(seed=5)
    np.testing.assert_array_equal(model.set_fuse(False)(x), pyincept.inception_v3(seed=5, fuse=False)(x))
    np.testing.assert_array_equal(model.set_fuse(True)(x), pyincept.inception_v3(seed=5)(x))


def test_unfused_torchvision_order_is_within_the_bar_too(tv_inception, converted):
    """fuse=False runs each 1x1 conv on its own and pools before the pool branch's conv, as torchvision does."""
    x = photo_batch()
    expected = torchvision_logits(tv_inception, x)
    unfused = pyincept.inception_v3(converted["zip"], fuse=False)(x)
    assert_within_bar(unfused, expected)
    fused = pyincept.inception_v3(converted["zip"])(x)
    assert np.abs(fused - unfused).max() <= 1e-4 * np.abs(expected).max()


def test_smallest_input_torchvision_allows(tv_inception, converted):
    x = photo_batch((75, 75))
    assert_within_bar(pyincept.inception_v3(converted["zip"])(x), torchvision_logits(tv_inception, x))


def test_named_outputs_match_torchvision_layers(tv_inception, converted):
    """`run` returns any layer by its dotted torchvision name, NHWC; the aux head too."""
    x = photo_batch()[:2]
    names = ["Mixed_5b.branch_pool", "Conv2d_4a_3x3", "maxpool2", "Mixed_6e", "Mixed_7b.branch3x3_2a", "avgpool"]
    captured = {}
    hooks = [
        tv_inception.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
        for name in names
    ]
    try:
        with torch.no_grad():
            logits = tv_inception(to_nchw(x))
            aux = tv_inception.AuxLogits(captured["Mixed_6e"])
    finally:
        for h in hooks:
            h.remove()

    out = pyincept.inception_v3(converted["zip"]).run(x, names + ["AuxLogits", "fc"])
    assert out["Mixed_5b.branch_pool"].shape == (2, 35, 35, 32)          # the blog post's picture
    assert out["avgpool"].shape == (2, 1, 1, 2048)
    for name in names:
        expected = to_nhwc(captured[name])
        np.testing.assert_allclose(out[name], expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert_within_bar(out["AuxLogits"], aux.numpy())
    assert_within_bar(out["fc"], logits.numpy())


@pytest.mark.parametrize("threads,micro_batch", [(2, 2), (3, 1), (1, 4)])
def test_batches_split_across_threads_give_each_images_own_result(monkeypatch, threads, micro_batch):
    """A batch runs in micro-batches on concurrent shards (kernels.map_batch). Each image's
    logits and taps are the same bits alone and inside the batch (every product is cut per
    image, `conv._gemm_pieces`), and two runs of the same batch are bit-identical.
    tests/test_determinism.py holds every layer to this under each OpenBLAS kernel."""
    from pyincept import config
    from pyincept.kernels import cpu

    model = pyincept.inception_v3(seed=0)
    x = np.concatenate([photo_batch(), photo_batch()[::-1, :, ::-1]])          # 10 images
    x = (x - x.mean()) / x.std()
    names = ["Mixed_5b.branch_pool", "AuxLogits", "fc"]
    alone = [model.run(x[i : i + 1], names) for i in range(len(x))]
    monkeypatch.setattr(config, "MICRO_BATCH", micro_batch)
    previous = cpu.get_num_threads()
    cpu.set_num_threads(threads)
    try:
        batch = model.run(x, names)
        again = model.run(x, names)
    finally:
        cpu.set_num_threads(previous)
    for name in names:
        expected = np.concatenate([a[name] for a in alone])
        assert batch[name].shape == expected.shape, name
        np.testing.assert_array_equal(batch[name], expected, err_msg=f"{name}: alone vs in a batch")
        np.testing.assert_array_equal(batch[name], again[name])


def test_run_stops_early_and_rejects_unknown_names():
    model = pyincept.inception_v3()
    x = np.zeros((1, 80, 90, 3), np.float32)
    out = model.run(x, "Conv2d_1a_3x3")
    assert out["Conv2d_1a_3x3"].shape == (1, 39, 44, 32)
    with pytest.raises(PyinceptError, match="unknown layer 'Mixed_9z'"):
        model.run(x, ["Mixed_9z"])
    assert "Mixed_5b.branch_pool" in model.layer_names() and "AuxLogits.fc" in model.layer_names()


@pytest.mark.parametrize(
    "shape,message",
    [((1, 299, 299), "NHWC"), ((1, 3, 299, 299), "NHWC"), ((1, 74, 299, 3), "at least 75x75"), ((2, 299, 60, 3), "at least 75x75")],
)
def test_bad_input_shapes_get_clear_errors(shape, message):
    with pytest.raises(PyinceptError, match=message):
        pyincept.inception_v3()(np.zeros(shape, np.float32))


def test_random_init_is_seeded_and_sane():
    a, b, c = (Inception3().random_parameters(seed) for seed in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fc.weight"], c["fc.weight"])
    x = photo_batch()[:2]
    logits = pyincept.inception_v3(seed=0)(x)
    np.testing.assert_array_equal(logits, pyincept.inception_v3(seed=0)(x))
    assert np.isfinite(logits).all() and 0.1 < np.abs(logits).max() < 1e3


def test_weight_file_refuses_pickles_wrong_versions_and_bad_shapes(tmp_path):
    params = Inception3().random_parameters(0)
    path = tmp_path / "w.npz"
    pyincept.save_weights(path, params, {"note": "test"})
    loaded, meta = pyincept.load_weights(path)
    assert meta == {"note": "test"} and all(np.array_equal(loaded[k], params[k]) for k in params)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, __format_version__=np.array(1), evil=np.array([object()], dtype=object))
    with pytest.raises(WeightsError, match="not a pyincept weight file"):
        pyincept.load_weights(pickled)

    future = tmp_path / "future.npz"
    np.savez(future, __format_version__=np.array(99))
    with pytest.raises(WeightsError, match="format 99"):
        pyincept.load_weights(future)

    bad = dict(params, **{"Mixed_6b.branch7x7_2.conv.weight": np.zeros((7, 1, 128, 128), np.float32)})
    pyincept.save_weights(tmp_path / "bad.npz", bad)
    with pytest.raises(WeightsError, match=r"'Mixed_6b.branch7x7_2.conv.weight' has shape \(7, 1, 128, 128\), expected \(1, 7, 128, 128\)"):
        pyincept.inception_v3(tmp_path / "bad.npz")

    missing = {k: v for k, v in params.items() if not k.startswith("AuxLogits.fc")}
    pyincept.save_weights(tmp_path / "missing.npz", missing)
    with pytest.raises(WeightsError, match="2 missing key"):
        pyincept.inception_v3(tmp_path / "missing.npz")

    with pytest.raises(WeightsError, match="no such weight file"):
        pyincept.inception_v3(tmp_path / "nope.npz")


def test_a_model_reads_each_array_of_its_file_once_and_checks_shapes_from_headers(tmp_path, monkeypatch):
    """Loading goes stage by stage through an open WeightFile: every parameter is read from
    the file exactly once (so the file's copy never lives whole beside the kernels'), the
    aux head's on its first tap, and a file of the wrong shapes is refused from the .npy
    headers, before any array is read."""
    from pyincept.io.npz import WeightFile

    params = Inception3().random_parameters(0)
    path = tmp_path / "w.npz"
    pyincept.save_weights(path, params, {"model": "inception_v3"})
    reads = []
    real = WeightFile.__getitem__
    monkeypatch.setattr(WeightFile, "__getitem__", lambda self, key: reads.append(key) or real(self, key))
    x = np.random.default_rng(0).standard_normal((1, 80, 80, 3)).astype(np.float32)
    model = pyincept.inception_v3(path)
    aux = sorted(k for k in params if k.startswith("AuxLogits."))
    assert aux and sorted(reads) == sorted(set(params) - set(aux))             # the aux head waits for a tap
    lazy = model(x)
    full = Inception3()
    full.load_parameters(dict(params))
    np.testing.assert_array_equal(lazy, full(x))
    reads.clear()
    x = np.random.default_rng(1).standard_normal((1, 299, 299, 3)).astype(np.float32)
    tapped = model.run(x, ["AuxLogits", "AuxLogits.conv1"])                      # its first tap reads its keys, once
    assert sorted(reads) == aux
    expected = full.run(x, ["AuxLogits", "AuxLogits.conv1"])
    for name in expected:
        np.testing.assert_array_equal(tapped[name], expected[name])
    model.run(x, ["AuxLogits"])
    assert sorted(reads) == aux
    with WeightFile(path) as weights:
        assert all(weights.shape(k) == params[k].shape for k in params) and len(weights) == len(params)

    reads.clear()
    bad = dict(params, **{"Mixed_7c.branch_pool.conv.weight": np.zeros((1, 1, 2048, 191), np.float32)})
    pyincept.save_weights(tmp_path / "bad.npz", bad)
    with pytest.raises(WeightsError, match="'Mixed_7c.branch_pool.conv.weight' has shape"):
        pyincept.inception_v3(tmp_path / "bad.npz")
    assert reads == []


def test_an_aux_head_loads_on_its_first_tap_once_and_refuses_a_changed_file(tmp_path, monkeypatch):
    """Concurrent first taps load the head once, each caller gets the eager model's bits;
    a file changed before the first tap is refused in one line; a seed's model taps too."""
    import threading

    from pyincept.io.npz import WeightFile
    from pyincept.models.googlenet import GoogLeNet

    params = GoogLeNet().random_parameters(0)
    path = tmp_path / "g.npz"
    pyincept.save_weights(path, params, {"model": "googlenet"})
    x = np.random.default_rng(2).standard_normal((2, 224, 224, 3)).astype(np.float32)
    full = GoogLeNet()
    full.load_parameters(dict(params))
    expected = full.run(x, ["aux1", "aux2.fc1"])
    model = pyincept.googlenet(path)
    assert model._unloaded_heads == {"aux1", "aux2"}
    reads, real = [], WeightFile.__getitem__
    results = [None] * 3
    barrier = threading.Barrier(len(results))

    def tap(i):
        barrier.wait()
        results[i] = model.run(x, ["aux1", "aux2.fc1"])

    monkeypatch.setattr(WeightFile, "__getitem__", lambda self, key: reads.append(key) or real(self, key))
    threads = [threading.Thread(target=tap, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(reads) == sorted(k for k in params if k.startswith(("aux1.", "aux2.")))
    for result in results:
        for name in expected:
            np.testing.assert_array_equal(result[name], expected[name])

    model = pyincept.googlenet(path)
    os.utime(path, ns=(0, 0))
    with pytest.raises(WeightsError, match="changed since the model was loaded from it"):
        model.run(x, ["aux1"])
    np.testing.assert_array_equal(model(x), full(x))                         # the rest runs on
    seeded = pyincept.googlenet(seed=0).run(x, ["aux2"])["aux2"]              # the seed's params are `params`
    assert seeded.shape == (2, 1000)
    np.testing.assert_array_equal(seeded, full.run(x, ["aux2"])["aux2"])


def test_weight_file_damaged_inside_or_not_an_npz_is_one_line(tmp_path):
    params = Inception3().random_parameters(0)
    path = tmp_path / "w.npz"
    pyincept.save_weights(path, params, {"model": "inception_v3"})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)                       # zeros inside some array's data: its CRC fails
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"damaged.npz: unreadable or corrupt weight file") as e:
        pyincept.inception_v3(damaged)
    assert "\n" not in str(e.value)
    bare = tmp_path / "bare.npz"
    with open(bare, "wb") as f:
        np.save(f, np.zeros(3, np.float32))
    with pytest.raises(WeightsError, match="not a pyincept weight file"):
        pyincept.load_model(bare)


def test_import_and_forward_never_load_torch():
    code = (
        "import sys, numpy as np, pyincept\n"
        "pyincept.inception_v3()(np.zeros((1, 75, 75, 3), np.float32))\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'tensorflow')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


PUBLISHED = os.environ.get("PYINCEPT_PUBLISHED_CHECKPOINT")


@pytest.mark.skipif(not PUBLISHED, reason="set PYINCEPT_PUBLISHED_CHECKPOINT to the published inception_v3_google-0cc3c7bd.pth")
def test_published_checkpoint_sees_grace_hoppers_uniform(tmp_path):
    """On the real published file: its hash prefix, and 'military uniform' in Grace Hopper's top-5."""
    from PIL import Image

    from pyincept.labels import imagenet_labels
    from pyincept.io.npz import sha256_file

    from pyincept.models import get_spec

    assert sha256_file(PUBLISHED).startswith(get_spec("inception_v3").default_weights.sha256_prefix)
    dst = tmp_path / "published.npz"
    pyincept.convert_checkpoint(PUBLISHED, dst)

    # torchvision's recipe for these weights: shorter side -> 342, centre crop 299, ImageNet
    # mean/std, then transform_input's map to the network's native [-1, 1] range.
    image = Image.open(next(p for p in PHOTOS if p.name == "grace_hopper.jpg")).convert("RGB")
    scale = 342 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - 299) // 2, (image.height - 299) // 2
    x = np.asarray(image.crop((left, top, left + 299, top + 299)), np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = (x - mean) / std * (std / 0.5) + (mean - 0.5) / 0.5
    logits = pyincept.inception_v3(dst)(x[None].astype(np.float32))
    top5 = [imagenet_labels()[i] for i in np.argsort(-logits[0])[:5]]
    assert "military uniform" in top5, top5
