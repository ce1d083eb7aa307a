"""The determinism promise, under every OpenBLAS kernel this CPU can run.

An image's output at every layer is the same bits alone and inside any batch, at any
thread count and micro-batch, and beside concurrent callers (README, "Determinism").
It must not rest on which kernel OpenBLAS picks: its AVX2 ("Haswell") kernel sums a
row in another order when the product has another number of rows, which broke the
promise on every AVX2-only CPU before the products were cut per image
(`kernels/conv.py:_gemm_pieces`). OpenBLAS picks its kernel once, when it loads, so each
kernel gets a fresh process (`determinism_check.py`) with OPENBLAS_CORETYPE set:
Haswell (AVX2), Prescott (SSE3, the generic kernels), SkylakeX (AVX-512) where the CPU
has it, and the variables unset (OpenBLAS's own choice, what users run).
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
X86 = platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernels():
    """(name, OPENBLAS_CORETYPE or None for unset, why it cannot run here or None)."""
    avx512 = "avx512f" in cpu_flags()
    not_x86 = None if X86 else "OPENBLAS_CORETYPE names x86-64 kernels"
    return [
        ("unset", None, None),
        ("Haswell", "Haswell", not_x86 or (None if "avx2" in cpu_flags() else "this CPU has no AVX2")),
        ("Prescott", "Prescott", not_x86),
        ("SkylakeX", "SkylakeX", not_x86 or (None if avx512 else "this CPU has no AVX-512")),
    ]


KERNELS = kernels()


def blas_environment(coretype):
    """This environment with OpenBLAS's kernel forced to `coretype`, or both variables unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    if coretype:
        env.update(OPENBLAS_CORETYPE=coretype, OPENBLAS_L2_SIZE="512")   # as these machines set them
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{kernel name: determinism_check.py's report} for every kernel that can run here."""
    folder = tmp_path_factory.mktemp("determinism")
    reports = {}
    for name, coretype, why_not in KERNELS:
        if why_not:
            continue
        result = subprocess.run([sys.executable, str(TESTS / "determinism_check.py"), str(folder / f"{name}.npy")],
                                cwd=TESTS, env=blas_environment(coretype), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}"
        reports[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("name,coretype,why_not", KERNELS, ids=[k[0] for k in KERNELS])
def test_every_layer_is_the_same_bits_in_any_batch_thread_count_and_beside_concurrent_callers(runs, name, coretype, why_not):
    if why_not:
        pytest.skip(why_not)
    report = runs[name]
    assert report["compared"] > 1000                            # every layer of every image, in every run
    assert not report["mismatches"], (f"under OpenBLAS's {report['blas']} kernel, {len(report['mismatches'])} "
                                      "outputs differ from the image alone, first: " + "; ".join(report["mismatches"][:5]))


@pytest.mark.slow
def test_other_blas_kernels_give_other_bits_within_float_rounding(runs):
    """The promise is per kernel: two kernels sum in different orders, so the same image's
    logits differ in the last bits (README gives the measured gap), never by more than float
    rounding of the network's sums."""
    forced = [name for name in runs if name != "unset"]
    if len(forced) < 2:
        pytest.skip("fewer than two OpenBLAS kernels can run here")
    architectures = {name: tuple(runs[name]["blas"]) for name in forced}
    assert len(set(architectures.values())) == len(forced), f"the forced kernels did not all differ: {architectures}"
    logits = {name: np.load(runs[name]["logits_file"]) for name in runs}
    reference = logits[forced[0]]
    scale = np.abs(reference).max()
    for name, other in logits.items():
        assert np.abs(other - reference).max() <= 1e-5 * scale, f"{name} vs {forced[0]}"


# --- concurrent callers, in this process (under whatever kernel this environment picks) ---


def test_concurrent_callers_on_one_model_and_on_two_get_the_bits_of_serial_calls():
    """Eight Python threads at once, each calling model(x), model.run or classify with its
    own batch (1 to 4 images), half of them on a second model with the same weights: every
    call gets exactly what the same call gets alone, and nothing is corrupted. Serially and
    concurrently, a lone image's layers are split with the helper thread or not (only one
    caller can have it), and the BLAS limit is set and released by other threads."""
    import threading

    import pyincept
    from photos import PHOTOS, photo_batch
    from pyincept.kernels import cpu

    models = [pyincept.inception_v3(seed=0), pyincept.inception_v3(seed=0)]
    x = photo_batch()
    x = np.concatenate([x, x[:, :, ::-1]])                      # 10 photographs
    jobs = [("call", slice(0, 1)), ("run", slice(1, 4)), ("classify", slice(0, 3)), ("call", slice(4, 8)),
            ("run", slice(2, 3)), ("call", slice(6, 8)), ("classify", slice(3, 5)), ("run", slice(8, 10))]

    def job(k):
        kind, images = jobs[k]
        model = models[k % 2]
        if kind == "call":
            return model(x[images])
        if kind == "run":
            out = model.run(x[images], ["Mixed_5b.branch_pool", "Mixed_6e", "avgpool"])
            return np.concatenate([out[name].reshape(len(out[name]), -1) for name in sorted(out)], axis=1)
        answers = list(pyincept.classify(PHOTOS[images], model, top=5, batch_size=2))
        return np.array([[t["index"] + t["probability"] for t in a.top] for a in answers], np.float64)

    previous = cpu.get_num_threads()
    cpu.set_num_threads(2)
    try:
        serial = [job(k) for k in range(len(jobs))]
        concurrent, errors = {}, []
        start = threading.Barrier(len(jobs))

        def caller(k):
            start.wait()
            try:
                for repeat in range(2):
                    concurrent[k, repeat] = job(k)
            except BaseException as e:                                  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        cpu.set_num_threads(previous)
    assert not errors, errors
    differ = [(jobs[k], repeat) for (k, repeat), y in sorted(concurrent.items()) if not np.array_equal(y, serial[k])]
    assert len(concurrent) == 2 * len(jobs) and not differ, f"{len(differ)} concurrent calls got other bits: {differ}"
