"""`pyincept activations` and `pyincept layers`: the study commands, run as a user runs them."""

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import pyincept
from conftest import run_cli
from photos import PHOTOS
from torch_oracle import to_nchw, to_nhwc


def test_activations_writes_the_blog_posts_grid(converted, tv_inception, tmp_path):
    out = tmp_path / "grid.png"
    result = run_cli("activations", PHOTOS[0], "--layer", "Mixed_5b.branch_pool", "--weights", converted["zip"],
                     "--out", out, "--cols", "4", "--pad", "0")
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(out))
    assert Image.open(out).size == (140, 280)

    # Tile by tile, the picture is torchvision's own output for that layer.
    x = pyincept.preprocess(pyincept.load_image(PHOTOS[0]))[None]
    captured = {}
    hook = tv_inception.Mixed_5b.branch_pool.register_forward_hook(lambda m, i, o: captured.setdefault("y", o))
    with torch.no_grad():
        tv_inception(to_nchw(x))
    hook.remove()
    expected = to_nhwc(captured["y"])[0]                                      # (35, 35, 32)
    for c in range(32):
        tile = grid[(c // 4) * 35 : (c // 4 + 1) * 35, (c % 4) * 35 : (c % 4 + 1) * 35].astype(int)
        t = expected[..., c]
        if t.max() > t.min():
            want = np.rint((t - t.min()) / (t.max() - t.min()) * 255)
            assert np.abs(tile - want).max() <= 1, c


def test_activations_scale_pad_and_errors(tmp_path):
    out = tmp_path / "g.png"
    ok = run_cli("activations", PHOTOS[1], "--layer", "Conv2d_1a_3x3", "--weights", "random", "--out", out,
                 "--cols", "8", "--pad", "2", "--scale", "2")
    assert ok.returncode == 0, ok.stderr
    assert Image.open(out).size == ((8 * 149 + 7 * 2) * 2, (4 * 149 + 3 * 2) * 2)

    unknown = run_cli("activations", PHOTOS[1], "--layer", "Mixed_9z", "--weights", "random", "--out", out)
    assert unknown.returncode == 1 and "unknown layer" in unknown.stderr and "Traceback" not in unknown.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    bad = run_cli("activations", broken, "--layer", "Mixed_5b", "--weights", "random", "--out", out)
    assert bad.returncode == 1 and "broken.jpg" in bad.stderr and "Traceback" not in bad.stderr
    assert run_cli("activations", PHOTOS[1], "--layer", "Mixed_5b", "--cols", "0").returncode == 2


def test_layers_lists_every_named_layer_with_totals():
    result = run_cli("layers")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Mixed_5b.branch_pool" in text and "35x35x32" in text
    assert "23.83 M params" in text and "5.713 GMACs" in text
    aux = run_cli("layers", "--aux", "--size", "320", "400")
    assert aux.returncode == 0 and "AuxLogits.conv1" in aux.stdout and "with aux head" in aux.stdout


def test_compile_fills_numbas_cache_with_every_kernel_a_model_runs(tmp_path):
    """`pyincept compile` at build time: afterwards classify compiles nothing new."""
    import os

    from PIL import Image

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    result = run_cli("compile", "--model", "googlenet", env=env)
    assert result.returncode == 0 and "compiled googlenet's kernels" in result.stdout and str(tmp_path) in result.stdout
    cached = {p.name for p in (tmp_path / "cache").rglob("*") if p.suffix in (".nbi", ".nbc")}
    assert cached
    image = tmp_path / "a.png"
    Image.fromarray(np.full((300, 260, 3), 90, np.uint8)).save(image)
    classified = run_cli("classify", image, image, image, "--model", "googlenet", "--weights", "random", "--quiet", env=env)
    assert classified.returncode == 0, classified.stderr
    assert {p.name for p in (tmp_path / "cache").rglob("*") if p.suffix in (".nbi", ".nbc")} == cached
    backward = subprocess.run([sys.executable, "-c", "import numpy as np, pyincept; "
                               "pyincept.googlenet().grad(np.zeros((2, 64, 80, 3), np.float32), [1, 2])"],
                              env=env, capture_output=True, text=True)
    assert backward.returncode == 0, backward.stderr
    assert {p.name for p in (tmp_path / "cache").rglob("*") if p.suffix in (".nbi", ".nbc")} == cached
