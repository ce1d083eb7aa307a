"""pyincept.metrics against the FID tools themselves (fid_oracle.py): each protocol's resize,
the features under each tool's protocol, and FID, KID and IS through `pyincept metrics`,
on photographs of several sizes and formats, with a random-weight FID network saved by
torch.save and converted by `pyincept convert`."""

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import pyincept
from conftest import run_cli
from fid_oracle import clean_fid_extractor, clean_fid_features, pytorch_fid_activations, pytorch_fid_uses, torch_fidelity_features
from photos import PHOTOS
from pyincept.errors import PyinceptError
from pyincept.metrics import FeatureStats, frechet_distance, inception_score, kernel_inception_distance
from pyincept.metrics import features as feats
from pyincept.metrics import protocols, stats as stats_module
from pyincept.metrics.fid import frechet_distance_sqrtm

pytest.importorskip("pytorch_fid")

SIZES = [(200, 200), (240, 320), (500, 375), (77, 431), (299, 299), (640, 480), (150, 90)]   # (W, H)


def make_set(folder, n, seed, shift=0):
    """n photographs, cropped and resized at random to SIZES, as JPEG and PNG, one greyscale
    and one with alpha (decoded as the tools decode them). shift: a colour cast, so two sets differ."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        im = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        w, h = im.size
        left, top = rng.integers(0, w // 4), rng.integers(0, h // 4)
        im = im.crop((left, top, left + w // 2 + rng.integers(0, w // 4), top + h // 2 + rng.integers(0, h // 4)))
        im = im.resize(SIZES[(i + seed) % len(SIZES)], Image.BILINEAR)
        if shift:
            im = Image.fromarray(np.clip(np.asarray(im, np.int16) + [shift, 0, -shift], 0, 255).astype(np.uint8))
        if i == 3:
            im = im.convert("L")
        if i == 5:
            im = im.convert("RGBA")
        path = folder / f"{i:02d}.{'png' if i % 2 or i in (3, 5) else 'jpg'}"
        im.save(path, quality=90) if path.suffix == ".jpg" else im.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {"a": make_set(root / "a", 16, 0), "b": make_set(root / "b", 14, 1, shift=40)}


@pytest.fixture(scope="module")
def model(fid_file):
    return pyincept.load_model(fid_file)


def rel(ours, theirs):
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


def metrics_json(*args):
    result = run_cli("metrics", *map(str, args), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- the protocols' resizes ------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 700), w=st.integers(1, 700), seed=st.integers(0, 2**31))
def test_the_bilinear_resizes_are_torchs_and_tensorflow_1s(h, w, seed):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8).astype(np.float32)
    t = torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy())
    tf1 = interpolate_bilinear_2d_like_tensorflow1x(t, size=(299, 299), align_corners=False)[0].numpy().transpose(1, 2, 0)
    assert np.array_equal(protocols.tf1_bilinear(pixels), tf1)
    x = pixels / np.float32(255)
    t = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
    bilinear = torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
    # torch's kernel rounds in its own order: within a few float32 ulps of [0, 1] values
    assert np.abs(protocols.torch_bilinear(x) - bilinear[0].numpy().transpose(1, 2, 0)).max() <= 4e-7


def test_the_clean_resize_is_clean_fids(sets):
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    for path in sets["a"][:7]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(protocols.pil_bicubic_per_channel(rgb.astype(np.float32)), resize(rgb))


def test_protocols_decode_as_the_tools_do(tmp_path):
    """PIL's convert("RGB"): alpha dropped, not composited (pyincept's classify composites over white)."""
    path = tmp_path / "a.png"
    Image.fromarray(np.dstack([np.full((40, 40, 3), 10, np.uint8), np.zeros((40, 40), np.uint8)]), "RGBA").save(path)
    assert np.asarray(pyincept.load_image(path, plain_rgb=True)).max() == 10
    assert np.asarray(pyincept.load_image(path)).min() == 255
    with pytest.raises(PyinceptError, match="unknown protocol"):
        protocols.get_protocol("tensorflow")


# --- features under each tool's protocol -------------------------------------------------------


def ours(model, files, protocol, names):
    return feats.extract(model, np.stack([protocols.PROTOCOLS[protocol](f) for f in files]), names)


@pytest.mark.slow
def test_features_match_pytorch_fid(fid_net, model, sets):
    mine = ours(model, sets["a"], "pytorch-fid", ["64", "192", "768", "2048"])
    for dims in (64, 192, 768, 2048):
        theirs = pytorch_fid_activations(fid_net, sets["a"], dims)
        assert rel(mine[str(dims)], theirs) <= 1e-4, dims


@pytest.mark.slow
def test_features_match_torch_fidelity(fid_pth, model, sets):
    theirs = torch_fidelity_features(fid_pth, sets["a"])
    mine = ours(model, sets["a"], "torch-fidelity", list(theirs))
    for name in theirs:
        assert rel(mine[name], theirs[name]) <= 1e-4, name


@pytest.mark.slow
def test_features_match_clean_fid(fid_net, model, sets):
    theirs = clean_fid_features(fid_net, sets["a"])
    assert rel(ours(model, sets["a"], "clean-fid", ["2048"])["2048"], theirs) <= 1e-4


def test_googlenet_cannot_give_the_features():
    with pytest.raises(PyinceptError, match="cannot give FID"):
        feats.check_model(pyincept.create_model("googlenet"))


# --- the scores, through the command line -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dims", [64, 2048])
def test_fid_matches_pytorch_fid(fid_net, fid_file, sets, dims):
    import pytorch_fid.fid_score as fs

    with pytorch_fid_uses(fid_net):
        theirs = fs.calculate_fid_given_paths([str(sets["a"][0].parent), str(sets["b"][0].parent)], 1, "cpu", dims, 0)
    out = metrics_json(sets["a"][0].parent, sets["b"][0].parent, "--fid", "--protocol", "pytorch-fid",
                       "--weights", fid_file, "--dims", dims)
    assert abs(out["frechet_inception_distance"] - theirs) <= 1e-3 * abs(theirs)
    assert (out["input1_images"], out["input1_failed"], out["input2_images"]) == (16, 0, 14)


@pytest.mark.slow
def test_fid_kid_and_is_match_torch_fidelity(fid_pth, fid_file, sets):
    import torch_fidelity

    a, b = sets["a"][0].parent, sets["b"][0].parent
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), cuda=False, fid=True, kid=True, isc=True, kid_subsets=20, kid_subset_size=8,
        isc_splits=4, batch_size=1, feature_extractor_weights_path=str(fid_pth), verbose=False, cache=False)
    out = metrics_json(a, b, "--fid", "--kid", "--isc", "--protocol", "torch-fidelity", "--weights", fid_file,
                       "--kid-subsets", 20, "--kid-subset-size", 8, "--isc-splits", 4, "--batch-size", 5)
    for key in ("frechet_inception_distance", "kernel_inception_distance_mean", "inception_score_mean"):
        assert abs(out[key] - theirs[key]) <= 1e-3 * abs(theirs[key]), key
    # the spreads agree as well (the same subsets and splits)
    for key in ("kernel_inception_distance_std", "inception_score_std"):
        assert abs(out[key] - theirs[key]) <= 1e-3 * abs(theirs[key]) + 1e-9, key


@pytest.mark.slow
def test_fid_matches_clean_fids_clean_mode(fid_net, fid_file, sets):
    from cleanfid import fid as cleanfid

    a, b = sets["a"][0].parent, sets["b"][0].parent
    with clean_fid_extractor(fid_net) as model_fn:
        theirs = cleanfid.compute_fid(str(a), str(b), mode="clean", custom_feat_extractor=model_fn, num_workers=0,
                                      batch_size=4, device=torch.device("cpu"), verbose=False)
    out = metrics_json(a, b, "--protocol", "clean-fid", "--weights", fid_file)
    assert abs(out["frechet_inception_distance"] - theirs) <= 1e-3 * abs(theirs)


@pytest.mark.slow
def test_statistics_files_go_both_ways_with_pytorch_fid(fid_net, fid_file, sets, tmp_path):
    import pytorch_fid.fid_score as fs

    a, b = sets["a"][0].parent, sets["b"][0].parent
    ours_a, theirs_b = tmp_path / "a.npz", tmp_path / "b.npz"
    result = run_cli("metrics", a, "--save-stats", ours_a, "--weights", fid_file, "--quiet", "--dims", 64)
    assert result.returncode == 0, result.stderr
    with pytorch_fid_uses(fid_net):
        fs.save_fid_stats([str(b), str(theirs_b)], 1, "cpu", 64, 0)                 # pytorch-fid writes b's
        theirs = fs.calculate_fid_given_paths([str(ours_a), str(theirs_b)], 1, "cpu", 64, 0)   # and reads ours
    out = metrics_json(ours_a, theirs_b)                                               # no network needed
    # the same statistics on both sides: what differs is scipy's sqrtm of the singular S1 S2
    assert abs(out["frechet_inception_distance"] - theirs) <= 1e-6 * theirs
    assert out["input1_images"] == 16 and out["input2_images"] is None


def test_statistics_are_the_same_bits_at_batch_sizes_1_7_and_50(model, sets):
    runs = [pyincept.metrics.compute_statistics(sets["a"][0].parent, model, "torch-fidelity", 2048, batch_size=n)
            for n in (1, 7, 50)]
    for other in runs[1:]:
        for field in ("sum", "outer_sum", "mu", "sigma"):
            assert np.array_equal(getattr(runs[0], field), getattr(other, field)), field
        assert other.count == 16


# --- the pieces, against numpy, scipy and torch-fidelity ---------------------------------------


def random_features(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return (np.abs(rng.standard_normal((n, d))) @ rng.random((d, d)) / d).astype(np.float32)


def test_statistics_match_numpy_and_merge_and_stream_in_any_chunks():
    x = random_features(150, 40)
    whole = FeatureStats.from_features(x)
    assert np.allclose(whole.mu, np.mean(x.astype(np.float64), axis=0), rtol=1e-13, atol=0)
    assert np.allclose(whole.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-11, atol=1e-15)
    for cuts in ([1] * 150, [7] * 21 + [3], [50, 50, 50], [149, 1], [64, 86]):
        streamed, start = FeatureStats(40), 0
        for n in cuts:
            streamed.add(x[start : start + n])
            start += n
        assert np.array_equal(streamed.sigma, whole.sigma) and np.array_equal(streamed.mu, whole.mu)
    # merging blocks of whole BLOCKs is exact; any other cut, within float64 rounding
    block = stats_module.BLOCK
    merged = FeatureStats.from_features(x[:block]).merge(FeatureStats.from_features(x[block:]))
    assert np.array_equal(merged.sigma, whole.sigma)
    merged = FeatureStats.from_features(x[:33]).merge(FeatureStats.from_features(x[33:]))
    assert merged.count == 150 and np.allclose(merged.sigma, whole.sigma, rtol=1e-12, atol=1e-16)


def test_statistics_files_round_trip_and_refuse_what_they_cannot_do(tmp_path):
    x = random_features(30, 8)
    path = tmp_path / "s.npz"
    FeatureStats.from_features(x, {"protocol": "clean-fid"}).save(path)
    back = FeatureStats.load(path)
    assert back.count == 30 and back.meta == {"protocol": "clean-fid"}
    assert np.array_equal(back.sigma, FeatureStats.from_features(x).sigma)
    back.merge(FeatureStats.from_features(x))
    assert back.count == 60
    plain = tmp_path / "plain.npz"
    np.savez_compressed(plain, mu=x.mean(0), sigma=np.cov(x, rowvar=False))              # pytorch-fid's own format
    only_moments = FeatureStats.load(plain)
    assert only_moments.count is None and np.allclose(only_moments.mu, x.mean(0))
    with pytest.raises(PyinceptError, match="mu and sigma only"):
        only_moments.merge(back)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PyinceptError, match="not a statistics file"):
        FeatureStats.load(tmp_path / "junk.npz")
    with pytest.raises(PyinceptError, match="at least 2"):
        FeatureStats.from_features(x[:1]).sigma


def torch_fidelity_fid(mu1, s1, mu2, s2):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    return fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)["frechet_inception_distance"]


@settings(max_examples=20, deadline=None)
@given(d=st.integers(2, 60), n1=st.integers(2, 90), n2=st.integers(2, 90), seed=st.integers(0, 2**31))
def test_fid_is_real_and_matches_the_eigenvalue_formula_for_any_rank(d, n1, n2, seed):
    """Any rank, singular covariances included (n <= d): torch-fidelity's eigenvalues of S1 S2."""
    s1, s2 = (FeatureStats.from_features(random_features(n, d, seed + i)) for i, n in enumerate((n1, n2)))
    ours_fid = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    theirs = torch_fidelity_fid(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert np.isfinite(ours_fid) and abs(ours_fid - theirs) <= 1e-6 * max(1.0, abs(theirs))


def test_fid_matches_scipys_sqrtm_where_that_works():
    s1, s2 = FeatureStats.from_features(random_features(400, 64, 1)), FeatureStats.from_features(random_features(300, 64, 2))
    args = (s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert abs(frechet_distance(*args) - frechet_distance_sqrtm(*args)) <= 1e-9 * frechet_distance_sqrtm(*args)
    assert frechet_distance(s1.mu, s1.sigma, s1.mu, s1.sigma) == pytest.approx(0, abs=1e-9)


def test_fid_refuses_mismatched_dims_and_nan():
    a, b = FeatureStats.from_features(random_features(10, 4)), FeatureStats.from_features(random_features(10, 5))
    with pytest.raises(PyinceptError, match="different dims"):
        frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    with pytest.raises(PyinceptError, match="NaN"):
        frechet_distance(a.mu * np.nan, a.sigma, a.mu, a.sigma)


def test_kid_and_is_are_torch_fidelitys():
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = random_features(60, 16, 1), random_features(50, 16, 2) * 1.2
    theirs = kid_features_to_metric(torch.from_numpy(x).double(), torch.from_numpy(y).double(), kid_subsets=30,
                                    kid_subset_size=20, verbose=False, rng_seed=2020, kid_kernel="poly",
                                    kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    mine = kernel_inception_distance(x, y, subsets=30, subset_size=20)
    for key in theirs:
        assert mine[key] == pytest.approx(theirs[key], rel=1e-12, abs=1e-15)
    logits = random_features(103, 30, 3) * 20
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=7, shuffle=True, rng_seed=2020)
    mine = inception_score(logits, splits=7)
    for key in theirs:
        assert mine[key] == pytest.approx(theirs[key], rel=1e-12)
    with pytest.raises(PyinceptError, match="kid-subset-size"):
        kernel_inception_distance(x, y, subset_size=1000)
    with pytest.raises(PyinceptError, match="isc-splits"):
        inception_score(logits[:5], splits=10)


# --- the command line's answers to bad input ------------------------------------------------


def test_a_corrupt_image_is_skipped_and_named_and_the_rest_scored(fid_file, sets, tmp_path):
    folder = tmp_path / "some"
    folder.mkdir()
    for p in sets["a"][:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_cli("metrics", folder, sets["b"][0].parent, "--weights", fid_file, "--quiet", "--dims", 64)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "frechet_inception_distance:" in result.stdout and "zz_broken.jpg" in result.stdout
    assert "4 image(s), 1 skipped" in result.stdout
    out = run_cli("metrics", folder, sets["b"][0].parent, "--weights", fid_file, "--quiet", "--dims", 64, "--json")
    scores = json.loads(out.stdout)
    assert (scores["input1_images"], scores["input1_failed"]) == (4, 1) and "zz_broken.jpg" in out.stderr


def test_bad_requests_get_one_line_and_exit_1(fid_file, sets, tmp_path):
    a = tmp_path / "a.npz"
    b = tmp_path / "b.npz"
    FeatureStats.from_features(random_features(10, 64)).save(a)
    FeatureStats.from_features(random_features(10, 192)).save(b)
    googlenet = tmp_path / "googlenet.npz"
    from pyincept.io.npz import save_weights

    g = pyincept.create_model("googlenet")
    save_weights(googlenet, g.random_parameters(), {"model": "googlenet"})
    folder = str(sets["a"][0].parent)
    for args, message in [
        ((a, b), "same --dims"),
        ((folder, b, "--kid", "--weights", fid_file), "KID and IS need the images"),
        ((folder, "--weights", fid_file), "nothing to compute"),
        ((folder, "--fid", "--weights", fid_file), "give INPUT2"),
        ((tmp_path / "missing", a), "no such file"),
        ((folder, a, "--weights", googlenet), "cannot give FID"),
        ((folder, "--isc", "--isc-splits", 20, "--weights", fid_file), "isc-splits"),
    ]:
        result = run_cli("metrics", *args, "--quiet")
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("pyincept: error:") and "Traceback" not in result.stderr


def test_few_images_give_a_value_and_a_warning(model, sets):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = pyincept.metrics.calculate_metrics(sets["a"][0].parent, sets["b"][0].parent, model=model, dims=64)
    assert np.isfinite(scores["frechet_inception_distance"]) and scores["frechet_inception_distance"] > 0
    assert any("covariance is singular" in str(w.message) for w in caught)


def test_statistics_of_different_protocols_are_compared_with_a_warning(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    FeatureStats.from_features(random_features(30, 8, 1), {"protocol": "clean-fid"}).save(a)
    FeatureStats.from_features(random_features(30, 8, 2), {"protocol": "pytorch-fid"}).save(b)
    result = run_cli("metrics", a, b)
    assert result.returncode == 0 and "different protocols (clean-fid and pytorch-fid)" in result.stderr
    assert float(result.stdout.split("frechet_inception_distance:")[1].split()[0]) > 0
