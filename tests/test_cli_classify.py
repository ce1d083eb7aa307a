"""`pyincept classify` as a user runs it: the real entry point in a subprocess, on real
photographs mixed with a generated corpus of broken files.

The oracle for the answers is torchvision's full pipeline on the same converted
weights: `Inception_V3_Weights.IMAGENET1K_V1.transforms()` and the network built with
`transform_input=True`.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import pyincept
from conftest import run_cli
from photos import PHOTOS
from pyincept.labels import imagenet_labels


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of good photographs (one in a sub-folder) and broken files with image names."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "nested").mkdir()
    good = []
    for i, photo in enumerate(PHOTOS):
        dst = (root / "nested" if i == 0 else root) / photo.name
        shutil.copy(photo, dst)
        good.append(dst)
    data = PHOTOS[0].read_bytes()
    broken = {
        "truncated.jpg": data[: len(data) // 3],
        "empty.png": b"",
        "text.jpg": b"this is not an image\n",
        "noise.png": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }
    for name, payload in broken.items():
        (root / name).write_bytes(payload)
    (root / "README.txt").write_text("not an image, and not named like one: skipped\n")
    return root, sorted(good), sorted(root / name for name in broken)


def torchvision_top5(state_dict, paths):
    """torchvision's full published pipeline: its transforms, and transform_input=True."""
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    model.load_state_dict(state_dict)
    model.eval()
    transform = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.transforms()
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        logits = model(x).numpy()
    return {str(p): list(np.argsort(-row, kind="stable")[:5]) for p, row in zip(paths, logits)}


def parse_jsonl(stdout):
    return {obj["path"]: obj for obj in map(json.loads, stdout.strip().splitlines())}


def test_folder_of_good_and_broken_files(corpus, converted, tv_inception):
    root, good, broken = corpus
    result = run_cli("classify", root, "--weights", converted["zip"], "--json", "--batch-size", "3")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    answers = parse_jsonl(result.stdout)
    assert sorted(answers) == sorted(str(p) for p in good + broken)        # README.txt skipped
    for path in broken:
        error = answers[str(path)]["error"]
        assert path.name in error and "\n" not in error
    expected = torchvision_top5(tv_inception.state_dict(), good)
    labels = imagenet_labels()
    for path in good:
        top = answers[str(path)]["top"]
        assert [t["index"] for t in top] == expected[str(path)], path.name
        assert [t["label"] for t in top] == [labels[i] for i in expected[str(path)]]
        probabilities = [t["probability"] for t in top]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_human_output_and_exit_zero(converted):
    result = run_cli("classify", PHOTOS[0], PHOTOS[1], "--weights", converted["zip"], "--top", "3", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(PHOTOS[0]) and len(lines) == 8                   # 2 x (path + 3 classes)
    assert result.stderr == ""


def test_missing_path_is_reported_not_fatal(converted, tmp_path):
    result = run_cli("classify", tmp_path / "nope.jpg", PHOTOS[0], "--weights", converted["zip"], "--quiet")
    assert result.returncode == 1
    assert str(PHOTOS[0]) in result.stdout
    assert "nope.jpg" in result.stderr and "Traceback" not in result.stderr


def test_progress_bar_goes_to_stderr_only(converted):
    result = run_cli("classify", *PHOTOS, "--weights", converted["zip"], "--json")
    assert result.returncode == 0
    assert len(parse_jsonl(result.stdout)) == len(PHOTOS)                   # stdout is pure JSON Lines


def test_no_weights_says_how_to_get_them(tmp_path):
    env = dict(os.environ, PYINCEPT_CACHE=str(tmp_path / "empty-cache"))
    env.pop("PYINCEPT_WEIGHTS", None)
    result = run_cli("classify", PHOTOS[0], env=env)
    assert result.returncode == 1
    assert "pyincept weights fetch" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_weights_from_environment(converted):
    env = dict(os.environ, PYINCEPT_WEIGHTS=str(converted["zip"]))
    assert run_cli("classify", PHOTOS[0], "--quiet", env=env).returncode == 0


@pytest.mark.parametrize("args", [["--top", "0"], ["--batch-size", "x"], []])
def test_usage_errors_exit_2(args):
    result = run_cli("classify", *args) if args else run_cli("classify")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_python_api_mirrors_the_cli(converted):
    model = pyincept.inception_v3(converted["zip"])
    results = list(pyincept.classify([PHOTOS[0], Image.open(PHOTOS[1]), "missing.jpg"], model, top=2))
    assert [r.error is None for r in results] == [True, True, False]
    assert results[1].path == "<image 1>" and len(results[0].top) == 2
    x = pyincept.preprocess(pyincept.load_image(PHOTOS[0]))[None]
    assert results[0].top[0]["index"] == int(model(x).argmax())


def test_cuda_without_a_gpu_is_one_clear_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    result = run_cli("classify", PHOTOS[0], "--weights", "random", "--device", "cuda", "--quiet", env=env)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyincept: error:") and "Traceback" not in result.stderr


def test_a_ctrl_c_python_dropped_still_stops_at_the_next_batch(tmp_path):
    """Python drops a KeyboardInterrupt raised inside a finalizer (it only prints it): the
    SIGINT handler's flag stops classify at its next batch all the same."""
    from pyincept.errors import INTERRUPTED

    image = tmp_path / "a.png"
    Image.fromarray(np.full((80, 80, 3), 10, np.uint8)).save(image)
    model = pyincept.create_model("googlenet")
    INTERRUPTED.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            list(pyincept.classify([image] * 3, model, batch_size=1))
    finally:
        INTERRUPTED.clear()
    assert len(list(pyincept.classify([image], model))) == 1
