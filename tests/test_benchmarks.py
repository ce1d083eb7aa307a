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
    "## GEMM ceiling",
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
    out = tmp_path / "report.md"
    p = run_suite(tmp_path, "--out", str(out), "--baseline", "HEAD")
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
    if importlib.util.find_spec("torch"):
        assert "| torch eager NCHW | " in text and "| torch eager channels_last | " in text
        assert "PASS** (required) pyincept vs torchvision logits" in text     # correctness is not a timing
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("torch"):
        assert "| onnxruntime | " in text
    else:
        assert "**onnxruntime**: skipped" in text


def test_quick_suite_on_googlenet(tmp_path):
    """`--model googlenet`: the same suite on GoogLeNet at 224x224, every engine on the same weights."""
    p = run_suite(tmp_path, "--model", "googlenet", "--no-scale")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    text = p.stdout
    assert text.startswith("# pyincept benchmark: GoogLeNet, 224x224 (quick smoke run"), text[:200]
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


def fake_results(batches=(1, 8, 32), rss_batch=32, ort=True, per_image=None):
    """What `benchmarks.__main__.run` returns, with round numbers: pyincept 100 ms per image
    at every batch, onnxruntime 80 ms, torch 150 ms (or `per_image`'s)."""
    per_image = per_image or {"pyincept": 0.100, "torch": 0.150, "ort": 0.080}
    names = ["pyincept", "torch"] + (["ort"] if ort else [])
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
                for n, m in {"pyincept": 500.0, "torch": 1000.0, "ort": 1000.0}.items() if n in names},
        "coldstart": {"warm": {"import_s": 0.2, "load_s": 0.2, "first_forward_s": 0.2, "total_s": 0.6, "wall_s": 0.7,
                               "peak_rss_mib": 350.0}},
        "gemm": [{"name": "Mixed_6e, fused 1x1s", "M": 289, "K": 768, "N": 768, "median": 0.001, "gflops": 200.0},
                 {"name": "square, not in v3 (reference)", "M": 2048, "K": 2048, "N": 2048, "median": 0.08,
                  "gflops": 250.0}],
        "layers": {"stages": [{"name": "Conv2d_1a_3x3", "kind": "BasicConv2d", "times": [0.01], "macs": 10**9},
                              {"name": "fc", "kind": "Linear", "times": [0.03], "macs": 2 * 10**9}],
                   "whole_times": [0.04]},
        "determinism": {"batch": 8, "max_abs_logit": 7.0, "alone_vs_batch_identical": True, "alone_vs_batch_max_abs": 0.0,
                        "alone_vs_batch_max_rel": 0.0, "top1_agree": True, "batch_rerun_identical": True,
                        "single_rerun_identical": True, "blas": ["Haswell"]},
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
        "blas": "openblas",
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
    assert status["peak RSS at batch 32 ≤ 0.6x onnxruntime's"] == "PASS"       # 500 / 1000
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
    other["plan"]["model"] = "googlenet"                                       # the other models: parity
    status = {text.split(":")[0]: s for s, _, text in report.targets(other)}
    assert status["batch-1 latency ≤ 1.0x onnxruntime"] == "PASS"            # 75 / 80
    assert status["batch-32 throughput ≥ 1.0x onnxruntime"] == "PASS"
    assert status["peak RSS at batch 32 ≤ 1.0x onnxruntime's"] == "PASS"       # 500 / 1000
    assert "RSS after loading ≤ 1.0x onnxruntime's" not in status

    quick = {text.split(":")[0]: s for s, _, text in report.targets(fake_results(batches=(1, 2), rss_batch=2, ort=False))}
    assert quick["batch-1 latency ≤ 0.8x onnxruntime"] == "SKIP"
    assert quick["batch-8 throughput ≥ 1.5x onnxruntime"] == "SKIP"
    assert quick["peak RSS at batch 32 ≤ 0.6x onnxruntime's"] == "SKIP"
    assert quick["RSS after loading ≤ 1.0x onnxruntime's"] == "SKIP"
    assert quick["batch-1 latency ≤ 0.75x torch eager (NCHW)"] == "PASS"


def test_render_has_every_section_and_the_ratios():
    text = report.render(fake_results())
    for header in HEADERS[:2] + HEADERS[3:]:
        assert header in text, header
    assert "| onnxruntime | 1.25x | 0.80x | 0.80x | 0.50x |" in text     # pyincept ÷ ort: latency, b8, b32, RSS
    assert "| torch eager NCHW | 0.67x | 1.50x | 1.50x | 0.50x |" in text
    assert "ceiling used for `% of GEMM ceiling` above: **200.0 GFLOP/s**" in text   # the square is not the ceiling
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
    assert "on GoogLeNet's own GEMM shapes at batch 1, 224x224. The best GoogLeNet shape is the ceiling" in text
    assert "as `GoogLeNet.run` calls them (the model holds no aux heads)" in text
    assert "the aux heads (aux1, aux2) are left out of every engine's copy" in text
    res["gemm_skipped"] = "no GEMM shapes of googlenet"
    assert "## GEMM ceiling\n\nNot measured: no GEMM shapes of googlenet." in report.render(res)


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
