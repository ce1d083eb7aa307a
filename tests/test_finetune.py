"""Fine-tuning (finetune.py): its steps against torch's own training loop on torchvision's
network, and the whole job from class folders to a weight file classify reads."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from photos import PHOTOS, photo_batch
from torch_oracle import to_nchw

import pyincept
from pyincept.errors import PyinceptError
from pyincept.finetune import (
    HEAD_INIT_STD,
    train_steps,
    trainable_keys,
    training_network,
)


def torch_losses(tv, inputs, targets, head, batches, optimizer, learning_rate, l2):
    """torch's loss before each step, training Mixed_7c and a new fc from Mixed_7b's output:
    eval mode, so batch norm is frozen and dropout the identity, as in pyincept."""
    import copy

    net = copy.deepcopy(tv).eval()
    net.fc = torch.nn.Linear(2048, head.shape[1])
    with torch.no_grad():
        net.fc.weight.copy_(torch.from_numpy(head.T.copy()))
        net.fc.bias.zero_()
    trained = list(net.Mixed_7c.parameters()) + list(net.fc.parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = (torch.optim.SGD(trained, lr=learning_rate, momentum=0.9, weight_decay=l2) if optimizer == "sgd"
           else torch.optim.Adam(trained, lr=learning_rate, weight_decay=l2))
    losses = []
    for batch in batches:
        x = to_nchw(inputs[batch])
        logits = net.fc(torch.flatten(F.adaptive_avg_pool2d(net.Mixed_7c(x), 1), 1))
        loss = F.cross_entropy(logits, torch.from_numpy(targets[batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer, learning_rate", [("sgd", 0.01), ("adam", 0.001)])
def test_ten_steps_follow_torchs_loss_curve(tv_inception, converted, optimizer, learning_rate):
    model = pyincept.load_model(converted["zip"])
    x = photo_batch()
    x = np.concatenate([x, x[:, :, ::-1]])                              # 10 images: the photos and their mirrors
    inputs = model.run(x, ["Mixed_7b"])["Mixed_7b"]                     # the frozen part's output, (10, 8, 8, 2048)
    targets = np.array([0, 1, 1, 0, 1] * 2)
    params = {k: np.asarray(v, np.float32) for k, v in model.reload().items()}
    head = (np.random.default_rng(3).standard_normal((2048, 2)) * HEAD_INIT_STD).astype(np.float32)
    params["fc.weight"], params["fc.bias"] = head, np.zeros(2, np.float32)
    net = training_network(model, 2, params)
    keys = trainable_keys(net, "Mixed_7c")
    assert not any(k.endswith(("running_mean", "running_var")) for k in keys) and "fc.weight" in keys
    assert all(k.startswith(("Mixed_7c.", "fc.")) for k in keys)
    rng = np.random.default_rng(5)
    batches = [rng.choice(10, 4, replace=False) for _ in range(10)]
    ours = train_steps(net, "Mixed_7c", inputs, targets, params, keys, batches, optimizer=optimizer,
                       learning_rate=learning_rate, l2=1e-3)
    theirs = torch_losses(tv_inception, inputs, targets, head, batches, optimizer, learning_rate, 1e-3)
    assert abs(theirs[-1] - theirs[0]) > 1e-2                             # the curve moves: the test can fail
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (step, ours, theirs)


@pytest.fixture()
def folders(tmp_path):
    """Two classes of photographs and their mirror images: 4 people, 6 things."""
    from PIL import Image, ImageOps

    data = tmp_path / "data"
    for label, photos in (("people", PHOTOS[0:4:3]), ("things", PHOTOS[1:3] + PHOTOS[4:])):
        (data / label).mkdir(parents=True)
        for photo in photos:
            shutil.copy(photo, data / label / photo.name)
            ImageOps.mirror(Image.open(photo)).save(data / label / f"mirror_{photo.name}")
    return data


@pytest.fixture()
def googlenet_file(tmp_path):
    """GoogLeNet's seeded random weights in a pyincept weight file."""
    path = tmp_path / "googlenet.npz"
    pyincept.save_weights(path, pyincept.googlenet().random_parameters(), {"model": "googlenet"})
    return path


def test_the_command_line_fine_tunes_and_classify_reads_the_result(folders, googlenet_file, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "tuned.npz"
    result = run_cli("retrain", folders, "--weights", googlenet_file, "--fine-tune", "inception5b", "--epochs", "2",
                     "--batch-size", "4", "--learning-rate", "0.01", "--test-fraction", "0.25",
                     "--validation-fraction", "0", "--cache", cache, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"{out}: googlenet fine-tuned from inception5b" in result.stdout and "people, things" in result.stdout
    meta = pyincept.load_weights(out)[1]
    assert meta["labels"] == ["people", "things"] and meta["num_classes"] == 2
    assert meta["trained_layers"][-1] == "fc" and all(name.startswith(("inception5b", "fc")) for name in
                                                       meta["trained_layers"])
    tuned = pyincept.load_model(out)
    assert tuned.num_classes == 2 and tuned.labels == ("people", "things") and not tuned.aux
    classified = run_cli("classify", PHOTOS[0], "--weights", out, "--top", "2")
    assert classified.returncode == 0, classified.stderr
    assert "people" in classified.stdout and "things" in classified.stdout
    # The trained part changed; the frozen part is the base weights' to the bit.
    base = pyincept.googlenet().reload()
    params = pyincept.load_weights(out)[0]
    assert np.array_equal(params["conv1.conv.weight"], base["conv1.conv.weight"])
    assert not np.array_equal(params["inception5b.branch1.conv.weight"], base["inception5b.branch1.conv.weight"])
    # A second run reads the frozen part's output from the cache.
    again = run_cli("retrain", folders, "--weights", googlenet_file, "--fine-tune", "inception5b", "--epochs", "1",
                    "--cache", cache, "--out", tmp_path / "again.npz", "--quiet", "--test-fraction", "0")
    assert again.returncode == 0, again.stderr
    assert len(list(cache.rglob("*.npy"))) == 10                          # each image's inception4e output, once
    assert "frozen part's outputs computed 0, cached 10" in again.stdout


@pytest.mark.parametrize("args, message", [
    (["--fine-tune", "Mixed_9z"], r"start must be one of Inception v3's stages"),
    (["--fine-tune", "Conv2d_1a_3x3"], r"trains the whole network"),
    (["--fine-tune", "Mixed_7c", "--optimizer", "lbfgs"], r"--fine-tune trains with sgd or adam"),
    (["--fine-tune", "Mixed_7c", "--augment"], r"--augment is for retraining the head alone"),
])
def test_bad_fine_tuning_requests_get_one_line(folders, tmp_path, args, message):
    import re

    weights = tmp_path / "v3.npz"
    pyincept.save_weights(weights, pyincept.inception_v3().random_parameters(), {"model": "inception_v3"})
    result = run_cli("retrain", folders, "--weights", weights, "--cache", tmp_path / "cache", "--quiet", *args)
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_fine_tuning_needs_the_models_own_parameters(folders):
    model = pyincept.googlenet()
    model.reload = None
    with pytest.raises(PyinceptError, match=r"needs the model's own parameters again"):
        pyincept.fine_tune(folders, model, "inception5b")


def test_retrain_with_fine_tune_hands_over_to_fine_tune(folders, tmp_path):
    model = pyincept.googlenet()
    tuned, report = pyincept.retrain(folders, model, fine_tune="inception5b", epochs=1, batch_size=4,
                                     validation_fraction=0, test_fraction=0, cache_dir=tmp_path)
    assert isinstance(tuned, pyincept.FineTuned) and tuned.labels == ("people", "things")
    assert report["trained_layers"][0] == "inception5b.branch1" and report["trained_layers"][-1] == "fc"
    assert report["hyperparameters"]["start"] == "inception5b" and len(report["history"]) == 1
    with pytest.raises(PyinceptError, match=r"augmentation is for retraining the head alone"):
        pyincept.retrain(folders, model, fine_tune="inception5b", augment=True)
