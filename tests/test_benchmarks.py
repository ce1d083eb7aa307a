"""The benchmark suite: `python -m benchmarks --quick` runs end to end (with every engine
installed here, with torch and onnxruntime hidden, and on GoogLeNet), and its pure parts are right:
the torchvision state dict holds pyincept's weights, and the report's arithmetic and
targets say what they should. No timing thresholds: numbers on a shared CI machine mean
nothing, only that the suite measures and reports.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))           # `benchmarks` is a folder of the repository, not an installed package

from benchmarks import engines, report  # noqa: E402

HEADERS = [
    "# pyincept benchmark",
    "## Headline",
    "| engine | batch-1 latency ms (median) | min – max ms | batch-2 img/s |",
    "## Latency, batch 1",
    "## Throughput",
    "## Peak memory",
    "## Start-up (pyincept)",
    "## Matrix product (one core)",
    "## Accuracy",
    "## Determinism (pyincept)",
    "## Where pyincept's time goes (batch 1)",
    "## Targets",
]


def run_suite(tmp_path, *args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--quiet", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_quick_suite_runs_and_reports(tmp_path):
    """The whole quick suite, with the code at HEAD as the baseline timed beside today's."""
    import json

    out, raw = tmp_path / "report.md", tmp_path / "raw.json"
    p = run_suite(tmp_path, "--out", str(out), "--json", str(raw), "--baseline", "HEAD")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    text = p.stdout
    for header in HEADERS + ["## Scale (pyincept)", "By batch size, 299x299:", "By input size:"]:
        assert header in text, header
    assert out.read_text() == text
    assert "| pyincept | " in text
    if (ROOT / ".git").exists():
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        assert f"| pyincept at {commit} (baseline) | " in text                 # timed, and in the ratio table
        assert f"baseline: `HEAD` = {commit}" in text
    else:
        assert "(baseline)**: skipped, no baseline at 'HEAD'" in text
    assert "## Errors" not in text
    # the roof was measured, in the pyincept engine's environment, and every table divides by it
    from benchmarks.worker import GEMM_SHAPES
    from pyincept.kernels import gemm

    res = json.loads(raw.read_text())
    assert res["simd"]["path"] == gemm.simd().name and set(res["simd"]["peak_gfma"]) == set(gemm.runnable_paths())
    assert all(v > 0 for v in res["simd"]["peak_gfma"].values())
    for title in ("Latency, batch 1", "Throughput", "Where pyincept's time goes (batch 1)"):
        assert float(cell(text, title, rows_of(text, title)[1][0], "% of FMA peak")) > 0, title
    # every raw sample of the matrix product, per library, and its section's pyincept column
    shapes = res["gemm"]["shapes"]
    assert [r["name"] for r in shapes] == [name for name, *_ in GEMM_SHAPES]
    for row in shapes:
        assert set(row["times"]) == set(res["gemm"]["libraries"]) and all(len(t) >= 3 for t in row["times"].values())
    assert f"pyincept {gemm.simd().name} GFLOP/s" in rows_of(text, "Matrix product (one core)")[0]
    assert ("pyincept (PYINCEPT_SIMD=avx2)" in text) == ("avx512" in gemm.runnable_paths())
    if importlib.util.find_spec("torch"):
        assert "| torch eager NCHW | " in text and "| torch eager channels_last | " in text
        assert "PASS** (required) pyincept vs torchvision logits" in text     # correctness is not a timing
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("torch"):
        assert "| onnxruntime | " in text
    else:
        assert "**onnxruntime**: skipped" in text


def test_quick_suite_on_googlenet(tmp_path):
    """`--model googlenet`: the same suite on GoogLeNet at 224x224, every engine on the same weights."""
    p = run_suite(tmp_path, "--model", "googlenet", "--no-scale", "--engines", "pyincept,pyincept-avx2,torch,torch-cl,ort")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    text = p.stdout
    assert text.startswith("# pyincept benchmark: GoogLeNet, 224x224 (quick smoke run"), text[:200]
    # the AVX2 micro-kernel as an engine, asked for by name: timed, and the same bits as pyincept's
    assert cell(text, "Accuracy", "pyincept (PYINCEPT_SIMD=avx2)", "max abs Δ vs pyincept") == "0.00e+00"
    assert "pyincept (PYINCEPT_SIMD=avx2)" in [r[0] for r in rows_of(text, "Latency, batch 1")]
    for header in HEADERS:
        assert header in text, header
    assert "One image at a time, 224x224." in text
    assert "GoogLeNet's own GEMM shapes at batch 1, 224x224" in text and "| inception3a, fused 1x1s |" in text
    assert "as `GoogLeNet.run` calls them (the model holds no aux heads)" in text
    assert "| inception5b | Inception |" in text and "| fc | Linear |" in text
    assert "the aux heads (aux1, aux2) are left out of every engine's copy" in text
    assert "`create_model(\"googlenet\", weights.npz)`" in text
    assert "Inception v3" not in text and "Inception3" not in text and "299x299" not in text
    assert "## Errors" not in text
    if importlib.util.find_spec("torch") and importlib.util.find_spec("onnx"):
        assert "`googlenet.onnx`" in text                                     # exported where onnx is installed
    if importlib.util.find_spec("torch"):
        assert "PASS** (required) pyincept vs torchvision logits" in text
        accuracy = text.split("## Accuracy")[1].split("## ")[0]
        rows = [line.split(" | ") for line in accuracy.splitlines() if line.startswith("| torch") or
                line.startswith("| onnxruntime")]
        engines_compared = {row[0].lstrip("| ") for row in rows}
        want = {"torch eager NCHW", "torch eager channels_last"} | (
            {"onnxruntime"} if importlib.util.find_spec("onnxruntime") else set())
        assert engines_compared == want, accuracy
        for row in rows:
            assert float(row[3]) <= 1e-3 and row[4].startswith("yes"), row       # Δ ÷ max |logit|, top-1


def test_baseline_without_the_model_is_refused(tmp_path):
    """`--baseline REV --model googlenet` where REV's pyincept has no GoogLeNet: one line, exit 2."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)  # noqa: E731
    root = git("rev-list", "--max-parents=0", "HEAD").stdout.split()[-1]     # the first commit: Inception v3 alone
    if git("cat-file", "-e", f"{root}:pyincept/models/googlenet.py").returncode == 0:
        pytest.skip("a shallow clone: its oldest commit already has GoogLeNet")
    p = run_suite(tmp_path, "--model", "googlenet", "--baseline", root, "--workdir", str(tmp_path / "work"))
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m benchmarks: error: --baseline {root}: "), p.stderr
    assert "has no googlenet (it has " in lines[0]
    assert not (tmp_path / "work" / engines.PYINCEPT_WEIGHTS).exists()      # refused before anything ran


HIDE = '''import sys
class _Hide:
    """Pretend torch, torchvision, onnx and onnxruntime are not installed."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnx", "onnxruntime"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Hide())
'''


def test_quick_suite_without_torch_or_onnxruntime(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HIDE)
    p = run_suite(tmp_path, "--no-scale", env={"PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for header in HEADERS:
        assert header in p.stdout, header
    assert "**torch eager NCHW**: skipped, not installed (torch, torchvision)" in p.stdout
    assert "**onnxruntime**: skipped, not installed (onnxruntime)" in p.stdout
    assert "Skipped (`--no-scale`)." in p.stdout
    assert "| pyincept | " in p.stdout and "| torch eager NCHW | " not in p.stdout


# --- the same weights in torchvision ------------------------------------------------------


def test_torchvision_state_dict_holds_pyincepts_weights():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from pyincept.models.inception_v3 import Inception3
    from pyincept.io.npz import torch_to_pyincept

    params = Inception3().random_parameters(3)
    state = engines.torchvision_state_dict(params)
    back = torch_to_pyincept({k: v.numpy() for k, v in state.items()})          # pyincept's own converter
    assert back.keys() == params.keys()
    for key in params:
        np.testing.assert_array_equal(back[key], params[key], err_msg=key)

    x = np.random.default_rng(0).standard_normal((2, 299, 299, 3)).astype(np.float32)
    ours = Inception3().load_parameters(params)(x)
    with torch.inference_mode():
        theirs = engines.torchvision_model(state)(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_googlenet_weights_in_torchvision():
    """GoogLeNet's weights, aux heads left out, load strictly into torchvision's twin (aux_logits=False),
    and both compute the same logits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from pyincept.models.googlenet import GoogLeNet

    params = engines.random_parameters("googlenet", 3)
    assert engines.aux_left_out("googlenet") == ["aux1", "aux2"] and engines.aux_left_out("inception_v3") == []
    assert not [k for k in params if k.startswith(("aux1.", "aux2."))]
    state = engines.torchvision_state_dict(params, name="googlenet")
    model = engines.torchvision_model(state, name="googlenet")             # strict=True: no key left over
    assert model.aux1 is None and model.aux2 is None

    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    ours = GoogLeNet().load_parameters(params)(x)
    with torch.inference_mode():
        theirs = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_fid_network_weights_in_pytorch_fids_twin():
    """The FID network's engines run pytorch-fid's own classes: its weights load strictly into
    them, and both compute the same 1008 logits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_fid")
    from benchmarks.worker import GEMM_SHAPES_BY_MODEL
    from pyincept.models.inception_v3_fid import Inception3FID

    assert engines.has_twin("inception_v3_fid") and "inception_v3_fid" in GEMM_SHAPES_BY_MODEL
    params = engines.random_parameters("inception_v3_fid", 3)
    model = engines.torchvision_model(engines.torchvision_state_dict(params, name="inception_v3_fid"),
                                      name="inception_v3_fid")                 # strict=True
    assert type(model.Mixed_7c).__name__ == "FIDInceptionE_2"
    x = np.random.default_rng(0).standard_normal((2, 299, 299, 3)).astype(np.float32)
    ours = Inception3FID().load_parameters(params)(x)
    with torch.inference_mode():
        theirs = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert ours.shape == (2, 1008)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_missing_engine_says_why(tmp_path):
    assert engines.missing("pyincept") is None
    assert engines.missing("pyincept", tmp_path) == f"no {engines.PYINCEPT_WEIGHTS}"
    if engines.installed("onnxruntime"):
        assert "needs torch" in engines.missing("ort", tmp_path)
    assert not engines.installed("surely_not_a_module_here")
    (tmp_path / engines.ONNX_MODEL).touch()                                   # Inception v3's, not GoogLeNet's
    if engines.installed("onnxruntime"):
        assert engines.missing("ort", tmp_path) is None
        assert engines.missing("ort", tmp_path, "googlenet").startswith("no googlenet.onnx")


# --- the report's arithmetic ---------------------------------------------------------------


def fake_results(batches=(1, 8, 32), rss_batch=32, ort=True, per_image=None, avx2=False):
    """What `benchmarks.__main__.run` returns, with round numbers: pyincept 100 ms per image
    at every batch, onnxruntime 80 ms, torch 150 ms (or `per_image`'s); with `avx2`, the
    pyincept-avx2 engine too, at 125 ms. The micro-kernel's peak: 50 GFMA/s on one core."""
    per_image = {"pyincept": 0.100, "torch": 0.150, "ort": 0.080, "pyincept-avx2": 0.125, **(per_image or {})}
    names = ["pyincept"] + (["pyincept-avx2"] if avx2 else []) + ["torch"] + (["ort"] if ort else [])
    plan = {"quick": False, "rounds": 1, "batches": list(batches), "repeats": [3] * len(batches), "threads": 2,
            "seed": 0, "rss_batch": rss_batch, "scale_size": 299}
    return {
        "plan": plan,
        "engines": {**{n: {"label": engines.label(n), "skipped": None} for n in names},
                    **({} if ort else {"ort": {"label": "onnxruntime", "skipped": "not installed (onnxruntime)"}})},
        "times": {n: {b: [per_image[n] * b * f for f in (0.9, 1.0, 1.2)] for b in batches} for n in names},
        "usage": {n: {b: {"cpu_s": 2.0, "wall_s": 1.0, "involuntary_switches": 10} for b in batches} for n in names},
        "loadavg": {n: [2.0] for n in names},
        "load_s": {},
        "rss": {n: {"batch": rss_batch, "after_load_mib": 300.0, "peak_rss_mib": m, "seconds": 1.0}
                for n, m in {"pyincept": 500.0, "pyincept-avx2": 500.0, "torch": 1000.0, "ort": 1000.0}.items()
                if n in names},
        "coldstart": {"warm": {"import_s": 0.2, "load_s": 0.2, "first_forward_s": 0.2, "total_s": 0.6, "wall_s": 0.7,
                               "peak_rss_mib": 350.0}},
        "simd": {"path": "avx2", "forced": None, "runnable": ["avx2", "generic"],
                 "peak_gfma": {"avx2": 50.0, "generic": 20.0}, "seconds": 0.5, "openblas": ["Haswell"]},
        "gemm": {"paths": ["avx2"], "libraries": ["pyincept avx2", "numpy"],
                 "shapes": [{"name": "Mixed_6e, fused 1x1s", "M": 289, "K": 768, "N": 768,
                             "times": {"pyincept avx2": [0.0125], "numpy": [0.025]},
                             "median": {"pyincept avx2": 0.0125, "numpy": 0.025},
                             "gflops": {"pyincept avx2": 80.0, "numpy": 40.0}},
                            {"name": "square, not in v3 (reference)", "M": 2048, "K": 2048, "N": 2048,
                             "times": {"pyincept avx2": [0.25], "numpy": [0.5]},
                             "median": {"pyincept avx2": 0.25, "numpy": 0.5},
                             "gflops": {"pyincept avx2": 68.7, "numpy": 34.4}}]},
        "layers": {"stages": [{"name": "Conv2d_1a_3x3", "kind": "BasicConv2d", "times": [0.01], "macs": 10**9},
                              {"name": "fc", "kind": "Linear", "times": [0.03], "macs": 2 * 10**9}],
                   "whole_times": [0.04]},
        "determinism": {"batch": 8, "max_abs_logit": 7.0, "alone_vs_batch_identical": True, "alone_vs_batch_max_abs": 0.0,
                        "alone_vs_batch_max_rel": 0.0, "top1_agree": True, "batch_rerun_identical": True,
                        "single_rerun_identical": True, "simd": "avx2"},
        "scale": None,
        "accuracy": {"torch": {"max_abs_logit": 7.0, "max_abs_delta": 7e-6, "relative": 1e-6, "top1_equal": True}},
        "macs_per_image": 5_713_000_000,
        "prepared": {"pyincept.npz": "x"},
        "errors": [],
        "elapsed_s": 1.0,
        "command": "python -m benchmarks",
        "date": "today",
        "loadavg_start": (0.1, 0.1, 0.1),
        "loadavg_end": (2.0, 1.0, 0.5),
        "machine": report.machine(),
        "versions": report.versions(),
        "numpy_blas": "scipy-openblas 0.3.31",
    }


def test_summary_and_ratio():
    assert report.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert report.summary([]) is None
    assert report.ratio(1.0, None) is None and report.ratio(None, 2.0) is None and report.ratio(1.0, 4.0) == 0.25
    assert report.gflops(5_713_000_000, 0.1) == pytest.approx(114.26)


def test_targets_pass_fail_skip():
    status = {text.split(":")[0]: s for s, _, text in report.targets(fake_results())}
    assert status["batch-1 latency ≤ 0.8x onnxruntime"] == "FAIL"            # 100 / 80 = 1.25
    assert status["batch-1 latency ≤ 0.75x torch eager (NCHW)"] == "PASS"      # 100 / 150 = 0.67
    assert status["batch-8 throughput ≥ 1.5x onnxruntime"] == "FAIL"           # 0.8
    assert status["batch-32 throughput ≥ 1.5x onnxruntime"] == "FAIL"
    assert status["peak RSS at batch 32 ≤ 0.5x onnxruntime's"] == "PASS"       # 500 / 1000
    assert status["RSS after loading ≤ 1.0x onnxruntime's"] == "PASS"          # 300 / 300
    assert status["warm-cache start-up (import, load, first forward) ≤ 1.5 s"] == "PASS"
    assert status["pyincept vs torchvision logits"] == "PASS"

    fast = fake_results(per_image={"pyincept": 0.050, "torch": 0.150, "ort": 0.080})
    fast["rss"]["pyincept"]["after_load_mib"] = 301.0
    status = {text.split(":")[0]: s for s, _, text in report.targets(fast)}
    assert status["batch-1 latency ≤ 0.8x onnxruntime"] == "PASS"            # 50 / 80 = 0.625
    assert status["batch-8 throughput ≥ 1.5x onnxruntime"] == "PASS"           # 1.6
    assert status["RSS after loading ≤ 1.0x onnxruntime's"] == "FAIL"

    other = fake_results(per_image={"pyincept": 0.075, "torch": 0.150, "ort": 0.080})
    other["plan"]["model"] = "googlenet"                                       # latency parity, batch 8 ahead
    status = {text.split(":")[0]: s for s, _, text in report.targets(other)}
    assert status["batch-1 latency ≤ 1.0x onnxruntime"] == "PASS"            # 75 / 80
    assert status["batch-8 throughput ≥ 1.2x onnxruntime"] == "FAIL"           # 80 / 75 = 1.07
    assert status["batch-32 throughput ≥ 1.0x onnxruntime"] == "PASS"
    assert status["peak RSS at batch 32 ≤ 1.0x onnxruntime's"] == "PASS"       # 500 / 1000
    assert "RSS after loading ≤ 1.0x onnxruntime's" not in status
    other["plan"]["model"] = "inception_v3_fid"                                # v3-sized: half onnxruntime's peak
    status = {text.split(":")[0]: s for s, _, text in report.targets(other)}
    assert status["peak RSS at batch 32 ≤ 0.5x onnxruntime's"] == "PASS"

    quick = {text.split(":")[0]: s for s, _, text in report.targets(fake_results(batches=(1, 2), rss_batch=2, ort=False))}
    assert quick["batch-1 latency ≤ 0.8x onnxruntime"] == "SKIP"
    assert quick["batch-8 throughput ≥ 1.5x onnxruntime"] == "SKIP"
    assert quick["peak RSS at batch 32 ≤ 0.5x onnxruntime's"] == "SKIP"
    assert quick["RSS after loading ≤ 1.0x onnxruntime's"] == "SKIP"
    assert quick["batch-1 latency ≤ 0.75x torch eager (NCHW)"] == "PASS"
    assert quick["no cliff by size"] == "SKIP"


def test_no_cliff_by_size_is_the_worst_step_of_time_per_mac():
    """Time per multiply-add at each input size against the next smaller one: a bigger input
    may cost less per MAC, never (beyond 10%) more."""
    def point(size, seconds, gmacs):
        return {"size": size, "batch": 4, "times": [seconds, seconds * 3, seconds / 3], "macs_per_image": gmacs * 1e9}

    res = fake_results()
    res["scale"] = {"batch": [], "size": [point(399, 0.5, 10.0), point(299, 0.3, 5.0), point(599, 1.0, 24.0),
                                          point(499, 0.9, 16.0)]}       # 15, 12.5, 14.1, 10.4 ns per MAC
    assert report.size_cliff(res) == pytest.approx((0.9 / 16) / (0.5 / 10))
    status = {text.split(":")[0]: s for s, _, text in report.targets(res)}
    assert status["no cliff by size"] == "FAIL"                                  # 499 costs 1.125x 399's per MAC
    res["scale"]["size"][3] = point(499, 0.78, 16.0)
    assert report.size_cliff(res) < 1.0
    assert {text.split(":")[0]: s for s, _, text in report.targets(res)}["no cliff by size"] == "PASS"


def test_render_has_every_section_and_the_ratios():
    text = report.render(fake_results())
    for header in HEADERS[:2] + HEADERS[3:]:
        assert header in text, header
    assert "| onnxruntime | 1.25x | 0.80x | 0.80x | 0.50x |" in text     # pyincept ÷ ort: latency, b8, b32, RSS
    assert "| torch eager NCHW | 0.67x | 1.50x | 1.50x | 0.50x |" in text
    text = report.render(fake_results(batches=(1, 2), rss_batch=2, ort=False))
    assert "**onnxruntime**: skipped, not installed (onnxruntime)" in text


def test_render_names_the_model():
    """A GoogLeNet run's report says GoogLeNet and 224x224 where an Inception v3 run's says neither."""
    res = fake_results()
    v3 = report.render(res)
    assert v3.startswith("# pyincept benchmark\n") and "One image at a time, 299x299." in v3
    assert "as `Inception3.run` calls them (AuxLogits not run)" in v3
    res["plan"].update({"model": "googlenet", "model_title": "GoogLeNet", "input_size": [224, 224]})
    res["layers"].update({"network": "GoogLeNet", "aux": []})
    res["aux_left_out"] = ["aux1", "aux2"]
    text = report.render(res)
    assert text.startswith("# pyincept benchmark: GoogLeNet, 224x224\n")
    assert "One image at a time, 224x224." in text and "299" not in text
    assert "on GoogLeNet's own GEMM shapes at batch 1, 224x224 (M rows" in text
    assert "as `GoogLeNet.run` calls them (the model holds no aux heads)" in text
    assert "the aux heads (aux1, aux2) are left out of every engine's copy" in text
    res["gemm"] = {"skipped": "no GEMM shapes of googlenet"}
    assert "## Matrix product (one core)\n\nNot measured: no GEMM shapes of googlenet." in report.render(res)


def rows_of(text, section):
    """The table rows of a report section, as lists of cells."""
    body = text.split(f"## {section}")[1].split("\n## ")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("| ")]


def cell(text, section, first, column):
    """The cell under header `column` in the row of `section` whose first cell is `first`."""
    head, *rows = rows_of(text, section)
    row = next(r for r in rows if r[0] == first)
    return row[head.index(column)]


def test_roofline_is_gflops_over_the_measured_peak_at_the_threads_used():
    """`% of FMA peak` = GFLOP/s ÷ (2 x threads x the micro-kernel's GFMA/s on one core, for the
    path pyincept ran): 50 GFMA/s and 2 threads make a 200 GFLOP/s roof."""
    res = fake_results()
    assert report.fma_peak(res) == 200.0 and report.fma_peak(res, threads=1) == 100.0
    text = report.render(res)
    # pyincept: 5.713 GMACs in 100 ms = 114.26 GFLOP/s = 57% of 200; torch (150 ms) 38%; onnxruntime (80 ms) 71%
    assert cell(text, "Latency, batch 1", "pyincept", "% of FMA peak") == "57"
    assert cell(text, "Latency, batch 1", "torch eager NCHW", "% of FMA peak") == "38"
    assert cell(text, "Latency, batch 1", "onnxruntime", "% of FMA peak") == "71"
    assert cell(text, "Throughput", "pyincept", "% of FMA peak") == "57"          # batch 8: the same rate per image
    assert "% of GEMM ceiling" not in text
    # the stages, against the same roof: 1 GMAC in 10 ms = 200 GFLOP/s; 2 in 30 ms = 133; 3 in 40 ms = 150
    stages = "Where pyincept's time goes (batch 1)"
    assert cell(text, stages, "Conv2d_1a_3x3", "% of FMA peak") == "100"
    assert cell(text, stages, "fc", "% of FMA peak") == "67"
    assert cell(text, stages, "**sum of stages**", "% of FMA peak") == "75"

    res["plan"]["threads"] = 4                                      # twice the cores: half the share
    text = report.render(res)
    assert cell(text, "Latency, batch 1", "pyincept", "% of FMA peak") == "29"
    assert cell(text, stages, "Conv2d_1a_3x3", "% of FMA peak") == "50"
    assert "2 x 4 x 50.0 = 400.0 GFLOP/s" in text

    res["simd"].update({"path": "generic", "forced": "generic"})     # the roof of the path pyincept ran
    assert report.fma_peak(res) == 2 * 4 * 20.0
    assert cell(report.render(res), "Latency, batch 1", "pyincept", "% of FMA peak") == "71"   # 114.26 / 160

    res["simd"] = None                                              # the probe failed: no roof, no column values
    text = report.render(res)
    assert report.fma_peak(res) is None
    assert cell(text, "Latency, batch 1", "pyincept", "% of FMA peak") == "–"
    assert "not measured (the `simd` worker failed" in text


def test_header_names_pyincepts_gemm_not_numpys_blas():
    res = fake_results()
    text = report.render(res)
    gemm_line = next(line for line in text.splitlines() if line.startswith("- **GEMM**"))
    assert "the **avx2** micro-kernel, the CPU's best (PYINCEPT_SIMD unset)" in gemm_line
    assert "**avx2 50.0 GFMA/s**, generic 20.0 GFMA/s" in gemm_line
    assert "2 x 2 x 50.0 = 200.0 GFLOP/s" in gemm_line
    assert "This CPU has no AVX-512: the AVX2 path is the only fast path here." in text
    blas_line = next(line for line in text.splitlines() if line.startswith("- **numpy's BLAS**"))
    assert "not pyincept's" in blas_line and "OpenBLAS kernel **Haswell**" in blas_line
    assert "used by pyincept" not in text and "GEMM ceiling" not in text
    threads = next(line for line in text.splitlines() if line.startswith("- **Threads**"))
    assert "pyincept: PYINCEPT_NUM_THREADS, the only one it reads" in threads

    res["simd"]["forced"] = "avx2"
    assert "the **avx2** micro-kernel, forced by `PYINCEPT_SIMD=avx2`" in report.render(res)
    res["simd"]["forced"] = "auto"
    assert "the **avx2** micro-kernel, the CPU's best (PYINCEPT_SIMD=auto)" in report.render(res)


def test_matrix_product_section():
    """pyincept's product and numpy's on one core, each as GFLOP/s and as a share of one core's
    peak (2 x 50 GFMA/s = 100 GFLOP/s); the peak of every path stated."""
    text = report.render(fake_results())
    title = "Matrix product (one core)"
    head = rows_of(text, title)[0]
    assert head == ["GEMM", "M", "K", "N", "pyincept avx2 median ms", "pyincept avx2 GFLOP/s", "% of FMA peak",
                    "np.matmul GFLOP/s", "% of FMA peak"]
    assert "| Mixed_6e, fused 1x1s | 289 | 768 | 768 | 12.50 | 80.0 | 80 | 40.0 | 40 |" in text
    assert "| square, not in v3 (reference) | 2048 | 2048 | 2048 | 250.00 | 68.7 | 69 | 34.4 | 34 |" in text
    intro = text.split(f"## {title}")[1].split("|")[0]
    assert "2 x 50.0 GFMA/s = **100.0 GFLOP/s** for the avx2 path pyincept ran" in intro
    assert "avx2 50.0 GFMA/s, generic 20.0 GFMA/s" in intro
    assert "numpy's BLAS held to one thread (threadpoolctl; OpenBLAS's Haswell kernel)" in intro
    assert "torch.matmul" not in intro                                  # no torch column in these results


def test_determinism_says_why_and_names_the_path():
    text = report.render(fake_results())
    det = text.split("## Determinism (pyincept)")[1].split("\n## ")[0]
    assert "on the avx2 micro-kernel. Every output of every matrix product is one FMA chain" in det
    assert "`kernels/gemm.py`" in det and "_gemm_pieces" not in det and "OpenBLAS" not in det


def test_pyincept_avx2_is_a_default_engine_exactly_where_avx512_runs():
    """The selection, on feature sets as llvmlite names them, not on this CPU's."""
    from benchmarks.worker import gemm_paths

    avx512 = {"avx512f", "avx2", "fma", "sse2"}
    assert engines.default_engines(avx512) == ["pyincept", "pyincept-avx2", "torch", "torch-cl", "ort"]
    assert engines.default_engines({"avx2", "fma", "sse2"}) == ["pyincept", "torch", "torch-cl", "ort"]
    assert engines.default_engines({"avx512f", "avx2", "sse2"}) == ["pyincept", "torch", "torch-cl", "ort"]  # no FMA
    assert engines.default_engines(set()) == ["pyincept", "torch", "torch-cl", "ort"]
    assert engines.label("pyincept-avx2") == "pyincept (PYINCEPT_SIMD=avx2)"
    # the matrix-product section times the path pyincept runs, and AVX2 beside AVX-512
    assert gemm_paths("avx512", ["avx512", "avx2", "generic"]) == ["avx512", "avx2"]
    assert gemm_paths("avx2", ["avx512", "avx2", "generic"]) == ["avx2"]
    assert gemm_paths("avx2", ["avx2", "generic"]) == ["avx2"]
    assert gemm_paths("generic", ["avx2", "generic"]) == ["generic"]
    # the header's line on the fast paths
    assert report.simd_paths_note(["avx2", "generic"]) == "This CPU has no AVX-512: the AVX2 path is the only fast path here."
    assert "pyincept-avx2" in report.simd_paths_note(["avx512", "avx2", "generic"])
    assert "generic path is the only one" in report.simd_paths_note(["generic"])


def test_pyincept_avx2_runs_with_its_own_environment(tmp_path):
    from benchmarks.__main__ import Suite, engine_env

    assert engine_env("pyincept-avx2", {}) == {"PYINCEPT_SIMD": "avx2"}
    assert engine_env("pyincept", {}) is None and engine_env("ort", {}) is None
    env = Suite(tmp_path, 2, verbose=False).env(engine_env("pyincept-avx2", {}))
    assert env["PYINCEPT_SIMD"] == "avx2" and env["PYINCEPT_NUM_THREADS"] == "2"
    assert engines.missing("pyincept-avx2", tmp_path) in (f"no {engines.PYINCEPT_WEIGHTS}",
                                                          "this CPU cannot run the avx2 path (it runs generic)")


def test_pyincept_avx2_in_every_timing_table_and_the_ratios_keep_pyincept():
    res = fake_results(avx2=True)
    res["simd"]["runnable"] = ["avx512", "avx2", "generic"]
    text = report.render(res)
    label = "pyincept (PYINCEPT_SIMD=avx2)"
    for title in ("Headline", "Latency, batch 1", "Throughput", "Peak memory"):
        assert label in [r[0] for r in rows_of(text, title)], title
    assert cell(text, "Latency, batch 1", label, "median ms") == "125.0"
    # the ratio table: the default pyincept over each other engine, the AVX2 one among them
    assert f"| {label} | 0.80x | 1.25x | 1.25x | 1.00x |" in text
    assert "| onnxruntime | 1.25x | 0.80x | 0.80x | 0.50x |" in text
    assert "`pyincept (PYINCEPT_SIMD=avx2)` times the AVX2 micro-kernel beside the AVX-512 one." in text
    status = {t.split(":")[0]: s for s, _, t in report.targets(res)}
    assert status["batch-1 latency ≤ 0.8x onnxruntime"] == "FAIL"               # still pyincept's 100 ms, not 125


def test_gpu_benchmark_without_a_gpu_says_why():
    """`python -m benchmarks.gpu` with no GPU visible: one line on stderr, exit 2, no traceback."""
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("benchmarks.gpu: device 'cuda' "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_engines_run_with_openblas_choosing_its_own_kernel_unless_asked(monkeypatch, tmp_path):
    """The OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE a machine sets are unset in every engine's
    process (users have neither), kept with --openblas-as-set, and a forced older kernel on
    an AVX-512 CPU is called out."""
    from benchmarks import report
    from benchmarks.__main__ import Suite

    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "512")
    users = Suite(tmp_path, 2, verbose=False).env()
    assert "OPENBLAS_CORETYPE" not in users and "OPENBLAS_L2_SIZE" not in users and users["OPENBLAS_NUM_THREADS"] == "2"
    as_set = Suite(tmp_path, 2, verbose=False, openblas_as_set=True).env()
    assert as_set["OPENBLAS_CORETYPE"] == "Haswell" and as_set["OPENBLAS_L2_SIZE"] == "512"
    plan = {"openblas_as_set": True, "openblas_env": {"OPENBLAS_CORETYPE": "Haswell"}}
    assert "older sgemm kernel" in report.forced_kernel_warning(plan, {"flags": ["avx2", "avx512f"]})
    assert report.forced_kernel_warning(plan, {"flags": ["avx2"]}) is None                 # Haswell is this CPU's best
    assert report.forced_kernel_warning({**plan, "openblas_as_set": False}, {"flags": ["avx512f"]}) is None
