"""The determinism promise: an image's output at every layer is the same bits alone and
inside any batch, at any thread count and micro-batch, beside concurrent callers, under
any OPENBLAS_CORETYPE and any PYINCEPT_SIMD path, on any CPU (README, "Determinism").

It rests on the arithmetic, not on a library's choices: every output of every matrix
product is one FMA chain in k order (kernels/gemm.py), and everything else on the forward
path sums in a fixed order. So each environment gets a fresh process
(`determinism_check.py`): OpenBLAS's kernel is chosen when it loads (Haswell, Prescott,
SkylakeX where the CPU has AVX-512, and unset, what users run), and the GEMM's SIMD path
when the first weights are packed. Every layer of every model must give the same bits in
all of them; and `test_the_logits_fingerprint_is_the_same_on_every_machine` holds the
logits to a SHA-256 committed from another machine, so CI on another CPU catches a break.
"""

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyincept.kernels import gemm

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


def environments():
    """(name, OPENBLAS_CORETYPE or None for unset, PYINCEPT_SIMD, full run?, why it cannot run
    here or None). The batch, thread and concurrency runs go once per SIMD path; every other
    environment fingerprints every layer of every model."""
    avx512 = "avx512f" in cpu_flags()
    not_x86 = None if X86 else "OPENBLAS_CORETYPE names x86-64 kernels"
    paths = gemm.runnable_paths()
    runs = [(f"unset, {path}", None, path, True, None) for path in paths]
    runs += [
        ("Haswell", "Haswell", "auto", False, not_x86 or (None if "avx2" in cpu_flags() else "this CPU has no AVX2")),
        ("Prescott", "Prescott", "auto", False, not_x86),
        ("SkylakeX", "SkylakeX", "auto", False, not_x86 or (None if avx512 else "this CPU has no AVX-512")),
    ]
    return runs


ENVIRONMENTS = environments()


def environment(coretype, simd):
    """This environment with OpenBLAS's kernel forced to `coretype` (both variables unset for
    None) and the GEMM's path set to `simd`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    if coretype:
        env.update(OPENBLAS_CORETYPE=coretype, OPENBLAS_L2_SIZE="512")   # as these machines set them
    env["PYINCEPT_SIMD"] = simd
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{environment name: determinism_check.py's report} for every environment that can run here."""
    folder = tmp_path_factory.mktemp("determinism")
    reports = {}
    for name, coretype, simd, full, why_not in ENVIRONMENTS:
        if why_not:
            continue
        out = folder / f"{name.replace(', ', '-')}.npy"
        command = [sys.executable, str(TESTS / "determinism_check.py"), str(out)] + ([] if full else ["--taps-only"])
        result = subprocess.run(command, cwd=TESTS, env=environment(coretype, simd), capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}"
        reports[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return reports


FULL = [e for e in ENVIRONMENTS if e[3]]


@pytest.mark.slow
@pytest.mark.parametrize("name,coretype,simd,full,why_not", FULL, ids=[e[0] for e in FULL])
def test_every_layer_is_the_same_bits_in_any_batch_thread_count_and_beside_concurrent_callers(
        runs, name, coretype, simd, full, why_not):
    report = runs[name]
    assert report["simd"] == simd
    assert report["compared"] > 1000                            # every layer of every image, in every run
    assert not report["mismatches"], (f"on the {simd} path, {len(report['mismatches'])} outputs differ from the "
                                      "image alone, first: " + "; ".join(report["mismatches"][:5]))


@pytest.mark.slow
def test_every_layer_of_every_model_is_the_same_bits_under_every_blas_kernel_and_simd_path(runs):
    """No OpenBLAS kernel reaches the forward path, and every SIMD path sums the same chains:
    v3, GoogLeNet and the FID network give every layer the same bits in every environment."""
    reference_name, reference = next(iter(runs.items()))
    assert len(reference["taps"]) > 300 and {key.split()[0] for key in reference["taps"]} >= {
        "inception_v3", "googlenet", "inception_v3_fid"}
    runnable = [e for e in ENVIRONMENTS if not e[4]]
    assert len(runs) == len(runnable)                           # every environment this CPU can run
    if len(runs) < 2:
        pytest.skip("only one environment runs on this CPU")
    for name, report in runs.items():
        differ = [key for key, digest in reference["taps"].items() if report["taps"].get(key) != digest]
        assert not differ, f"{name} vs {reference_name}: {len(differ)} layers differ, first: {differ[:5]}"
    logits = {name: np.load(report["logits_file"]) for name, report in runs.items() if report["compared"]}
    for name, other in logits.items():
        np.testing.assert_array_equal(other, logits[reference_name], err_msg=name)


# The cross-machine fingerprint: SHA-256 of the float32 logits of inception_v3() and googlenet()
# (seed 0) on tests/data's photographs (tests/photos.py) and on a pattern of integers (no
# decoder, no random numbers), and of what they start from: the seed's weights and the pixels
# the photographs decode to. Committed from an AMD EPYC of family 25 (Zen 3, AVX2); any CPU
# must give the same bits.
FINGERPRINTS = {
    "weights inception_v3": "a9933caceecfc4da4223e28f014975413127c5fde4f218be5f1b68642ed12136",
    "weights googlenet": "1a92e6d0ba9101dadf64f7207cab5c8235858a84b50ced9edcebc683c2730cdc",
    "pixels 299": "c5d5d37b094088f987631867846d1d63f91ecaad1e49dfcddf2b8aef2fec246d",
    "pixels 224": "825c492434ee49feade43efa3c5f7f776fdb2c3e8c6e5f16e9be0eeb4a6d842d",
    "photos inception_v3": "b244feb8e8c64efdb01d70f269be08628a9c4d7a2d147fbf4953eba5962cf5ef",
    "photos googlenet": "12ead026afbdd1fa7f97f0605f5a7fa3898ba4da016a3c83b2e765f66ed014ea",
    "pattern inception_v3": "e52c3f9922e800ab6303e26cad83f3358185031c5b5962a2af996b60cf3c47f0",
    "pattern googlenet": "f4ba3f62abfd0c23e96f4da5581b3b448d4852a4bcb3f5f414f7fd1414a17193",
}


def sha256(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def weights_digest(model, seed=0):
    """SHA-256 of the seed's parameters, key by key in order, as float32."""
    h = hashlib.sha256()
    for key, value in sorted(model.random_parameters(seed).items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(value, np.float32).tobytes())
    return h.hexdigest()


def integer_pattern(size, n=2):
    """(n, size, size, 3) float32 in [-1, 1) from integers alone: exact on every machine."""
    i = np.arange(n * size * size * 3, dtype=np.int64).reshape(n, size, size, 3)
    return (((i * 2654435761) % 1000) / 500.0 - 1.0).astype(np.float32)


@pytest.mark.parametrize("name,size", [("inception_v3", 299), ("googlenet", 224)])
def test_the_logits_fingerprint_is_the_same_on_every_machine(name, size):
    import pyincept
    from photos import photo_batch

    model = pyincept.create_model(name, seed=0)
    if weights_digest(model) != FINGERPRINTS[f"weights {name}"]:
        pytest.skip("the seed's weights are other numbers here (another NumPy random stream): nothing to compare")
    inputs = {"pattern": integer_pattern(size)}
    x = photo_batch((size, size))
    if sha256(x) == FINGERPRINTS[f"pixels {size}"]:              # else another Pillow or libjpeg decoded them
        inputs["photos"] = x
    for kind, x in inputs.items():
        logits = model(x)
        assert logits.shape == (len(x), 1000) and np.isfinite(logits).all()
        assert sha256(logits) == FINGERPRINTS[f"{kind} {name}"], (
            f"{name}'s logits on the {kind} are other bits on this CPU ({gemm.simd().name} path): the promise "
            "of one set of bits everywhere is broken")


# --- concurrent callers, in this process (under whatever kernel this environment picks) ---


def test_concurrent_callers_on_one_model_and_on_two_get_the_bits_of_serial_calls():
    """Eight Python threads at once, each calling model(x), model.run or classify with its
    own batch (1 to 4 images), half of them on a second model with the same weights: every
    call gets exactly what the same call gets alone, and nothing is corrupted. Serially and
    concurrently, a lone image's layers are split with the helper thread or not (only one
    caller can have it)."""
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
