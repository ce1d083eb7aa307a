"""Ray: the same answers as one process, every input once, through a killed worker, an
interrupt and a rerun. Every Ray run here is `--ray local` (or ray="local"): it starts a Ray
instance on 127.0.0.1 with this machine's CPUs and shuts it down when the command ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyincept
from conftest import run_cli
from photos import PHOTOS
from pyincept.errors import PyinceptError
from pyincept.export import load_features
from pyincept.metrics import FeatureStats

pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "v3.npz"
    model = pyincept.create_model("inception_v3")
    pyincept.save_weights(path, model.random_parameters(), {"model": "inception_v3"})
    return path


def image_folder(folder, n, broken=True):
    """n photographs of several sizes (JPEG and PNG) and, with `broken`, two files that are not images."""
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        im = im.resize((120 + 13 * i, 100 + 7 * i))
        im.save(folder / f"img{i:03d}.{'png' if i % 3 == 0 else 'jpg'}")
    if broken:
        (folder / "img005b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        (folder / "zz_empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("imgs") / "photos", 14)


def test_without_ray_installed_ray_is_a_one_line_error(monkeypatch, weights, images):
    import pyincept.distributed as distributed
    from pyincept.distributed.tasks import ClassifyTask

    monkeypatch.setattr(distributed, "ray_available", lambda: False)
    with pytest.raises(PyinceptError, match=r"pip install \"pyincept\[ray\]\""):
        list(distributed.run_shards(ClassifyTask(distributed.ModelSource(str(weights))), ["a.jpg"], 4, ray="local"))


def test_import_pyincept_never_imports_ray():
    code = "import sys, pyincept, pyincept.distributed, pyincept.distributed.tasks, pyincept.export; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_classify_on_ray_answers_exactly_as_one_process(weights, images):
    local = run_cli("classify", images, "--weights", weights, "--json", "--quiet")
    on_ray = run_cli("classify", images, "--weights", weights, "--json", "--quiet", "--ray", "local", "--shard-size", "3")
    assert local.returncode == on_ray.returncode == 1                   # two broken files, in both
    assert on_ray.stdout == local.stdout                                # the same lines, order and bits
    answers = [json.loads(line) for line in on_ray.stdout.splitlines()]
    assert len(answers) == 16 and len({a["path"] for a in answers}) == 16
    assert sum("error" in a for a in answers) == 2 and "Traceback" not in on_ray.stderr


def test_features_and_statistics_on_ray_are_one_process_s(weights, fid_file, images, tmp_path):
    run_cli("features", images, "--weights", weights, "--out", tmp_path / "here", "--quiet", "--shard-size", 5)
    result = run_cli("features", images, "--weights", weights, "--out", tmp_path / "ray", "--quiet", "--shard-size", 4,
                     "--format", "parquet", "--ray", "local", "--workers", 2, "--threads-per-worker", 1)
    assert result.returncode == 1 and "2 unreadable" in result.stdout
    here, there = load_features(tmp_path / "here"), load_features(tmp_path / "ray")
    assert here[0] == there[0] and len(here[0]) == 14 and np.array_equal(here[1], there[1])
    assert sorted(here[2]) == sorted(there[2]) and len(here[2]) == 2
    # statistics: merged in float64 from 4 shards, within 1e-12 of one process; KID's and IS's features the same bits
    options = dict(kid=True, isc=True, kid_subset_size=5, kid_subsets=7, isc_splits=3, weights=fid_file)
    one = pyincept.calculate_metrics(images, images, save_stats=[tmp_path / "one.npz"], **options)
    many = pyincept.calculate_metrics(images, images, save_stats=[tmp_path / "many.npz"], ray="local", shard_size=4, **options)
    a, b = FeatureStats.load(tmp_path / "one.npz"), FeatureStats.load(tmp_path / "many.npz")
    assert a.count == b.count == 14
    for x, y in ((a.mu, b.mu), (a.sigma, b.sigma)):
        assert np.abs(x - y).max() <= 1e-12 * np.abs(x).max()
    for key in ("kernel_inception_distance_mean", "kernel_inception_distance_std", "inception_score_mean", "inception_score_std"):
        assert one[key] == many[key], key
    assert [len(r["failed"]) for r in (one["input1"], many["input1"])] == [2, 2]


def _actor_pids():
    """The processes of Ray Data's actors running pyincept's shard worker."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"_ShardWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _command(*args):
    return [sys.executable, "-m", "pyincept", *map(str, args)]


def test_a_worker_killed_mid_run_still_answers_every_image_once(weights, tmp_path):
    folder = image_folder(tmp_path / "photos", 24, broken=False)
    run_cli("features", folder, "--weights", weights, "--out", tmp_path / "here", "--quiet", "--shard-size", 2, check=True)
    out = tmp_path / "ray"
    job = subprocess.Popen(_command("features", folder, "--weights", weights, "--out", out, "--quiet", "--shard-size", 2,
                                    "--ray", "local", "--workers", 1, "--threads-per-worker", 2),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(out.glob("shard-*.npz")), 240, "the first shard")
        victims = _actor_pids()
        assert victims, "no actor process found"
        os.kill(victims[0], signal.SIGKILL)                                # mid-run: 11 of 12 shards to go
        stdout, stderr = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, stderr
    assert len(list(out.glob("shard-*.npz"))) == 12
    here, there = load_features(tmp_path / "here"), load_features(out)
    assert there[0] == here[0] and len(set(there[0])) == 24             # every image once, nothing twice
    assert np.array_equal(there[1], here[1])


def test_an_interrupt_leaves_whole_shards_and_a_rerun_resumes(weights, tmp_path):
    folder = image_folder(tmp_path / "photos", 16, broken=False)
    out = tmp_path / "out"
    job = subprocess.Popen(_command("features", folder, "--weights", weights, "--out", out, "--quiet", "--shard-size", 1),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(list(out.glob("shard-*.npz"))) >= 3, 240, "three shards")
        job.send_signal(signal.SIGINT)                                     # Ctrl-C
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    written = sorted(out.glob("shard-*.npz"))
    assert 3 <= len(written) < 16 and not list(out.glob("*.part"))
    for shard in written:                                                  # each complete, or absent
        with np.load(shard, allow_pickle=False) as f:
            assert len(f["paths"]) == 1 and f["features"].shape == (1, 2048)
    stamps = {p.name: p.stat().st_mtime_ns for p in written}
    rerun = run_cli("features", folder, "--weights", weights, "--out", out, "--quiet", "--shard-size", 1,
                    "--ray", "local")
    assert rerun.returncode == 0, rerun.stderr
    assert f"{16 - len(written)} of 16 shard(s), {len(written)} already there" in rerun.stdout
    assert {p.name: p.stat().st_mtime_ns for p in written} == stamps      # the finished ones were not redone
    whole = tmp_path / "whole"
    run_cli("features", folder, "--weights", weights, "--out", whole, "--quiet", "--shard-size", 4, check=True)
    assert load_features(out)[0] == load_features(whole)[0]
    assert np.array_equal(load_features(out)[1], load_features(whole)[1])


def test_an_export_folder_of_other_settings_is_refused(weights, images, tmp_path):
    run_cli("features", images, "--weights", weights, "--out", tmp_path / "o", "--quiet", "--shard-size", 20)
    result = run_cli("features", images, "--weights", weights, "--out", tmp_path / "o", "--quiet", "--shard-size", 20,
                     "--layer", "Mixed_7c")
    assert result.returncode == 1 and "holds an export with other layer" in result.stderr.strip().splitlines()[-1]
    with pytest.raises(PyinceptError, match="every worker can read"):
        pyincept.calculate_metrics(images, images, model=pyincept.create_model("inception_v3_fid"), ray="local")
