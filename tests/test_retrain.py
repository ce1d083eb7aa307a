"""Retraining the top layer: the loss's gradient, the trainers, the bottleneck cache, the
head file, and `pyincept retrain` / `classify --head` as a user runs them.

The gradient is checked twice, against finite differences and against torch autograd.
The end-to-end runs use the seeded random init (`--weights random`): its features are
meaningless for ImageNet but still tell apart pictures as different as the generated
ones here (a red field, grey stripes, a blue checkerboard), and it needs no download.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import pyincept
from conftest import run_cli
from pyincept import cli
from pyincept.retrain import (
    CENTER,
    Head,
    attach_head,
    augmented_views,
    render_view,
    softmax_cross_entropy,
    split_dataset,
    train_softmax,
)

CLASSES = ("checker", "red", "stripes")
PER_CLASS = 8
OPTIONS = {"epochs": 20, "validation_fraction": 0.15, "test_fraction": 0.25}   # 2 test images per class


def picture(kind, i):
    """A small, noisy picture of one of three kinds; every (kind, i) differs."""
    rng = np.random.default_rng(1000 * CLASSES.index(kind) + i)
    h, w = rng.integers(48, 80, size=2)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "red":
        rgb = np.stack([np.full((h, w), 200.0), np.full((h, w), 60.0), np.full((h, w), 40.0)], -1)
    elif kind == "stripes":
        v = 127 + 120 * np.sign(np.sin(yy * rng.uniform(0.3, 0.6) + rng.uniform(0, 6)))
        rgb = np.stack([v, v, v], -1)
    else:
        c = ((xx // 8 + yy // 8) % 2) * 200.0
        rgb = np.stack([np.full((h, w), 20.0), np.full((h, w), 60.0), c + 40], -1)
    rgb += rng.normal(0, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def make_dataset(root, classes=CLASSES, per_class=PER_CLASS):
    for kind in classes:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            picture(kind, i).save(root / kind / f"{kind}_{i}.png")
    return root


@pytest.fixture(scope="module")
def model():
    return pyincept.inception_v3()          # seeded random init: "random-seed-0"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pictures") / "data")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bottlenecks")


@pytest.fixture(scope="module")
def trained(dataset, model, cache):
    return pyincept.retrain(dataset, model, cache_dir=cache, **OPTIONS)


# --- the loss and its gradient ------------------------------------------------------


@st.composite
def softmax_problem(draw):
    """(features (N, D), targets (N,), weight (D, K), bias (K,), l2), float64, built from a drawn seed."""
    N, D, K = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(2, 5))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    l2 = draw(st.sampled_from([0.0, 0.01, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.standard_normal((N, D)) * scale, rng.integers(0, K, N), rng.standard_normal((D, K)),
            rng.standard_normal(K), l2)


@settings(max_examples=60, deadline=None)
@given(softmax_problem())
def test_gradient_matches_finite_differences(problem):
    x, y, weight, bias, l2 = problem
    _, grad_w, grad_b = softmax_cross_entropy(weight, bias, x, y, l2)
    eps = 1e-6
    for params, grad in ((weight, grad_w), (bias, grad_b)):
        numeric = np.zeros_like(params)
        for index in np.ndindex(params.shape):
            saved = params[index]
            params[index] = saved + eps
            up = softmax_cross_entropy(weight, bias, x, y, l2)[0]
            params[index] = saved - eps
            down = softmax_cross_entropy(weight, bias, x, y, l2)[0]
            params[index] = saved
            numeric[index] = (up - down) / (2 * eps)                # central difference: error O(eps^2)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_loss_and_gradient_match_torch_autograd():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 5)) * 3, rng.integers(0, 4, 7)
    weight, bias, l2 = rng.standard_normal((5, 4)), rng.standard_normal(4), 0.3
    loss, grad_w, grad_b = softmax_cross_entropy(weight, bias, x, y, l2)

    w_t = torch.tensor(weight, requires_grad=True)
    b_t = torch.tensor(bias, requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(torch.tensor(x) @ w_t + b_t, torch.tensor(y)) + 0.5 * l2 * (w_t**2).sum()
    loss_t.backward()
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-12)
    np.testing.assert_allclose(grad_w, w_t.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grad_b, b_t.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_loss_is_finite_for_huge_logits():
    loss, grad_w, _ = softmax_cross_entropy(np.eye(2) * 1e4, np.zeros(2), np.array([[1.0, -1.0]]), np.array([1]))
    assert np.isfinite(loss) and loss == pytest.approx(2e4) and np.all(np.isfinite(grad_w))


# --- the trainers -------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "lbfgs"])
def test_trainer_separates_gaussian_classes(optimizer):
    """Four well separated Gaussian clouds in 2048 dimensions, all positive like ReLU features."""
    rng = np.random.default_rng(1)
    K, D = 4, 2048
    centres = rng.uniform(0, 1, (K, D))

    def sample(n):
        y = rng.integers(0, K, n)
        return np.maximum(centres[y] + rng.normal(0, 1.0, (n, D)), 0).astype(np.float32), y

    (x, y), (x_test, y_test) = sample(200), sample(200)
    weight, bias, history = train_softmax(x, y, K, optimizer=optimizer, epochs=20, validation=(x_test, y_test))
    assert weight.shape == (D, K) and weight.dtype == np.float32 and bias.shape == (K,)
    accuracy = np.mean(np.argmax(x_test @ weight + bias, axis=1) == y_test)
    assert accuracy >= 0.95, accuracy
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # The standardisation folded back into the layer: same logits, so the same loss as recorded during training.
    loss, _, _ = softmax_cross_entropy(weight.astype(np.float64), bias.astype(np.float64), x.astype(np.float64), y)
    assert loss == pytest.approx(history[-1]["train_loss"], rel=1e-3, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 15), min_size=2, max_size=5), st.sampled_from([0.0, 0.1, 0.3]),
       st.sampled_from([0.0, 0.1, 0.5]), st.integers(0, 100))
def test_split_is_stratified_deterministic_and_trains_every_class(sizes, validation, test, seed):
    targets = np.repeat(np.arange(len(sizes)), sizes)
    train, val, held = split_dataset(targets, validation, test, seed)
    assert sorted(np.concatenate([train, val, held])) == list(range(len(targets)))      # a partition
    assert set(targets[train]) == set(range(len(sizes)))                                  # every class trains
    if test > 0:
        assert set(targets[held]) == set(range(len(sizes)))                               # every class is tested
    again = split_dataset(targets, validation, test, seed)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, held), again))


# --- retraining end to end (Python API) ---------------------------------------------


def test_retrain_reaches_high_test_accuracy(trained, dataset):
    head, report = trained
    assert head.labels == CLASSES and head.weight.shape == (2048, 3) and head.weight.dtype == np.float32
    assert report["split"] == {"train": 15, "validation": 3, "test": 6, "augmented_train_features": 0}
    assert report["test_accuracy"] >= 0.9, report["confusion_matrix"]
    assert np.sum(report["confusion_matrix"]) == 6
    assert report["bottlenecks_computed"] + report["bottlenecks_cached"] == 3 * PER_CLASS
    assert len(report["history"]) == OPTIONS["epochs"] and report["skipped"] == []
    meta = head.meta
    assert meta["weights"]["identity"] == "random-seed-0" and meta["trained_at"].endswith("+00:00")
    assert meta["images_per_class"] == {kind: PER_CLASS for kind in CLASSES}
    assert meta["hyperparameters"]["optimizer"] == "sgd" and meta["metrics"]["test_accuracy"] == report["test_accuracy"]


def test_cache_makes_reruns_free_and_same_seed_gives_the_same_head(trained, dataset, model, cache):
    head, _ = trained
    again, report = pyincept.retrain(dataset, model, cache_dir=cache, **OPTIONS)
    assert report["bottlenecks_computed"] == 0 and report["bottlenecks_cached"] == 3 * PER_CLASS
    assert again.weight.tobytes() == head.weight.tobytes() and again.bias.tobytes() == head.bias.tobytes()
    other, report = pyincept.retrain(dataset, model, cache_dir=cache, **{**OPTIONS, "seed": 1})
    assert report["bottlenecks_computed"] == 0
    assert other.weight.tobytes() != head.weight.tobytes()


def test_cache_is_keyed_by_content_a_changed_image_alone_is_recomputed(trained, dataset, model, cache, tmp_path):
    copy = shutil.copytree(dataset, tmp_path / "moved")               # new names, same bytes: all cached
    _, report = pyincept.retrain(copy, model, cache_dir=cache, **OPTIONS)
    assert report["bottlenecks_computed"] == 0
    changed = copy / "red" / "red_3.png"
    pixels = np.asarray(Image.open(changed)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(changed)
    _, report = pyincept.retrain(copy, model, cache_dir=cache, **OPTIONS)
    assert report["bottlenecks_computed"] == 1 and report["bottlenecks_cached"] == 3 * PER_CLASS - 1
    cached = sorted(p.name for p in cache.rglob("*.npy"))
    assert len(cached) == 3 * PER_CLASS + 1 and all(len(name) == 64 + 4 for name in cached)
    assert np.load(next(cache.rglob("*.npy")), allow_pickle=False).shape == (2048,)


def test_augmented_views_are_cached_seeded_and_for_training_only(trained, dataset, model, cache):
    options = {**OPTIONS, "augment": True, "views": 1}
    _, report = pyincept.retrain(dataset, model, cache_dir=cache, **options)
    assert report["split"]["augmented_train_features"] == 15 and report["bottlenecks_computed"] == 15
    _, report = pyincept.retrain(dataset, model, cache_dir=cache, **options)
    assert report["bottlenecks_computed"] == 0
    digest = "ab" * 32
    assert augmented_views(digest, 0, 3) == augmented_views(digest, 0, 3) != augmented_views(digest, 1, 3)
    image = picture("stripes", 0)
    assert render_view(image, CENTER) is image
    flipped = render_view(image, {"crop": None, "flip": True})
    assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])
    crop = render_view(image, {"crop": [0.0, 0.0, 0.5, 0.5], "flip": False})
    assert crop.size == (round(image.width / 2), round(image.height / 2))


def test_unreadable_images_are_skipped_and_named(dataset, model, cache, tmp_path):
    copy = shutil.copytree(dataset, tmp_path / "data")
    (copy / "red" / "broken.png").write_bytes(b"not a picture")
    (copy / "stripes" / "empty.jpg").write_bytes(b"")
    head, report = pyincept.retrain(copy, model, cache_dir=cache, **OPTIONS)
    assert [s["path"] for s in report["skipped"]] == [str(copy / "red" / "broken.png"), str(copy / "stripes" / "empty.jpg")]
    assert "broken.png" in report["skipped"][0]["error"] and head.meta["skipped"] == [s["path"] for s in report["skipped"]]
    assert report["test_accuracy"] >= 0.9 and report["images_per_class"]["red"] == PER_CLASS


# --- the head: file and attachment --------------------------------------------------


def test_head_file_round_trip_without_pickle(trained, tmp_path):
    head, _ = trained
    head.save(tmp_path / "head.npz")
    with np.load(tmp_path / "head.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["__format_version__", "__meta__", "bias", "labels", "weight"]
        assert npz["labels"].dtype.kind == "U" and npz["weight"].dtype == np.float32
        assert json.loads(str(npz["__meta__"]))["weights"]["identity"] == "random-seed-0"
    loaded = Head.load(tmp_path / "head.npz")
    assert loaded.labels == head.labels and loaded.meta == head.meta
    assert np.array_equal(loaded.weight, head.weight) and np.array_equal(loaded.bias, head.bias)


def test_googlenet_retrains_on_its_1024_d_pool_in_the_same_cache(dataset, cache):
    """Any registered model: GoogLeNet's head takes its 1024-d bottleneck, its cached entries
    never collide with v3's (the key names the model), and `classify --head` answers with it."""
    model = pyincept.googlenet()
    head, report = pyincept.retrain(dataset, model, cache_dir=cache, **OPTIONS)
    assert head.weight.shape == (1024, 3) and head.meta["model"] == "googlenet"
    assert report["bottlenecks_computed"] == 3 * PER_CLASS                   # none taken from v3's entries
    assert report["test_accuracy"] >= 0.5, report["confusion_matrix"]
    attach_head(model, head)
    assert model(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 3)


def test_attach_head_makes_the_model_answer_with_its_classes(trained):
    head, _ = trained
    model = pyincept.inception_v3()
    x = np.random.default_rng(0).standard_normal((2, 75, 75, 3)).astype(np.float32)
    features = model.run(x, ["avgpool"])["avgpool"]
    attach_head(model, head)
    assert model.labels == CLASSES
    logits = head.logits(features)                 # a 2048-deep float32 dot product per logit
    answer = model(x)
    np.testing.assert_allclose(answer, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    # Switching a knob reloads the weights the model dropped (its seed's): the head stays.
    np.testing.assert_array_equal(model.set_fuse(False).set_fuse(True)(x), answer)
    assert model.set_algorithm("im2col")(x).shape == (2, len(CLASSES)) and model.fc.out_features == len(CLASSES)
    with pytest.raises(pyincept.PyinceptError, match="takes 10 features"):
        attach_head(model, Head(np.zeros((10, 2)), np.zeros(2), ["a", "b"]))


# --- the command line ---------------------------------------------------------------


def test_cli_retrain_then_classify_with_the_head(dataset, cache, tmp_path):
    data = shutil.copytree(dataset, tmp_path / "data")
    (data / "checker" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    head = tmp_path / "head.npz"
    result = run_cli("retrain", data, "--out", head, "--weights", "random", "--cache", cache, "--epochs", "20",
                     "--validation-fraction", "0.15", "--test-fraction", "0.25", "--optimizer", "adam", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "broken.jpg" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("epoch  1/20  train loss") and "validation loss" in lines[0]
    assert any(line.startswith("test accuracy 100.0% on 6 image(s)") for line in lines), result.stdout
    table = lines[lines.index("confusion matrix (rows: true class, columns: predicted class):") + 1 :][:4]
    assert table[0].split()[-3:] == list(CLASSES) and table[2].split() == ["red", "0", "2", "0"]

    images = [data / kind / f"{kind}_0.png" for kind in CLASSES]
    result = run_cli("classify", "--head", head, "--weights", "random", "--json", "--top", "10", "--quiet", *images)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["path"] for a in answers] == [str(p) for p in images]
    assert all(len(a["top"]) == 3 for a in answers)                                   # top-K capped at K
    assert [a["top"][0]["label"] for a in answers] == list(CLASSES)


def test_two_processes_retraining_on_one_folder_leave_whole_entries_with_each_images_own_bits(dataset, tmp_path):
    """Two `retrain` runs at once, on the same folder and the same cache, extracting in
    batches of 3 and of 8: every entry they leave loads, holds a (2048,) float32 vector,
    and is exactly the bits of that view computed alone (issue 13's batch invariance: who
    wrote an entry, and beside which images, never shows), with no temporary file left."""
    import subprocess
    import sys

    from pyincept.retrain import BottleneckCache, compute_bottlenecks, preprocessing_for, weights_identity

    shared = tmp_path / "shared"
    script = ("import sys\nimport pyincept\nfrom pyincept.retrain import retrain\n"
              "retrain(sys.argv[1], pyincept.inception_v3(), cache_dir=sys.argv[2], extract_batch_size=int(sys.argv[3]),"
              " augment=True, views=2, epochs=2, validation_fraction=0.15, test_fraction=0.25)\n")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(dataset), str(shared), str(batch)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for batch in (3, 8)]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    entries = {p.relative_to(shared): p for p in shared.rglob("*.npy")}
    assert not [p for p in shared.rglob("*") if p.is_file() and p.suffix != ".npy"], "a temporary file was left"

    model = pyincept.inception_v3()
    alone = tmp_path / "alone"
    paths = sorted(dataset.rglob("*.png"))
    compute_bottlenecks(paths, lambda digest: [CENTER, *augmented_views(digest, 0, 2)], model, BottleneckCache(alone),
                        weights_identity(model), dict(preprocessing_for(model)), batch_size=1)
    expected = {p.relative_to(alone): p for p in alone.rglob("*.npy")}
    assert len(entries) >= len(paths) and set(entries) <= set(expected)    # every plain view, some augmented ones
    for key, path in entries.items():
        vector = np.load(path, allow_pickle=False)
        assert vector.shape == (2048,) and vector.dtype == np.float32, key
        np.testing.assert_array_equal(vector, np.load(expected[key], allow_pickle=False), err_msg=str(key))


def one_error_line(capsys, argv):
    assert cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("pyincept: error: "), err
    return err


def test_bad_data_folders_get_one_line(tmp_path, capsys):
    cases = {}
    cases["no such folder"] = tmp_path / "missing"
    (tmp_path / "file.png").write_bytes(b"x")
    cases["not a folder"] = tmp_path / "file.png"
    (tmp_path / "empty").mkdir()
    cases["no class folders"] = tmp_path / "empty"
    cases["only one class"] = make_dataset(tmp_path / "one", classes=["red"], per_class=2)
    cases["has 1 image"] = make_dataset(tmp_path / "few", classes=["red", "stripes"], per_class=2)
    (cases["has 1 image"] / "stripes" / "stripes_1.png").unlink()
    cases["has 0 image"] = make_dataset(tmp_path / "hollow", classes=["red", "stripes"], per_class=2)
    shutil.rmtree(cases["has 0 image"] / "stripes")
    (cases["has 0 image"] / "stripes").mkdir()
    for message, folder in cases.items():
        assert message in one_error_line(capsys, ["retrain", folder, "--weights", "random", "--quiet"])


def test_class_with_one_readable_image_gets_one_line_naming_the_broken_one(tmp_path, cache, capsys):
    data = make_dataset(tmp_path / "data", classes=["red", "stripes"], per_class=2)
    (data / "stripes" / "stripes_1.png").write_bytes(b"garbage")
    err = one_error_line(capsys, ["retrain", data, "--weights", "random", "--cache", cache, "--quiet"])
    assert "'stripes' has 1 readable image(s)" in err and "stripes_1.png" in err


def test_bad_head_files_get_one_line(tmp_path, capsys):
    image = tmp_path / "red.png"
    picture("red", 0).save(image)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(tmp_path / "other.npz", weight=np.zeros((2048, 2), np.float32))
    np.save(tmp_path / "array.npy", np.zeros(3))
    np.savez(tmp_path / "odd.npz", weight=np.zeros((4, 2)), bias=np.zeros(2), labels=np.array(["a", "b"]),
             __format_version__=np.array("one"), __meta__=np.array("{}"))
    np.savez(tmp_path / "pickled.npz", weight=np.zeros((4, 2)), bias=np.zeros(2), labels=np.array(["a", None]),
             __format_version__=np.array(1), __meta__=np.array("{}"))
    for name, message in [("missing.npz", "no such head file"), ("corrupt.npz", "not a head file"),
                          ("other.npz", "not a head file"), ("array.npy", "not a head file"),
                          ("odd.npz", "not an integer"), ("pickled.npz", "not a head file"), ("", "is a folder")]:
        assert message in one_error_line(capsys, ["classify", "--head", tmp_path / name, "--weights", "random", image])


def test_bad_input_through_the_real_entry_point(tmp_path):
    result = run_cli("retrain", tmp_path / "nowhere", "--weights", "random")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"pyincept: error: {tmp_path / 'nowhere'}: no such folder"]
    assert run_cli("retrain", tmp_path, "--optimizer", "newton").returncode == 2
