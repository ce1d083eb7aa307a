"""The engines under test, all holding the same weights.

- `pyincept`: this package, on the `.npz` written by `pyincept.save_weights`.
- `torch`: torchvision's `inception_v3` in eager mode, NCHW, under `torch.inference_mode()`.
- `torch-cl`: the same model and input in `torch.channels_last` memory format.
- `ort`: ONNX Runtime's CPU execution provider on an ONNX export of that torchvision model
  (graph optimisations on, which folds batch norm into the convolutions as pyincept does).

One set of random weights, `pyincept.inception_v3.random_parameters(seed)`, is written
once by `prepare` in each engine's own format: pyincept's `.npz`, a torch state dict
(`.pt`, conv weights HWIO -> OIHW, fc (in, out) -> (out, in)) and the ONNX file. Each
engine then loads only its own file, so a torch process never imports numba and a
pyincept process never imports torch: peak memory is each engine's own. The accuracy
section of the report checks that all of them compute the same logits.

Inputs are made NHWC (pyincept's layout) and moved to each engine's native layout
*before* the clock starts: the timings are the model, not a transpose.

What this is not: a wrapper anyone should deploy; thread settings and layouts are
fixed to make the comparison fair, not to be convenient.
"""

import importlib.util
import os
import sys
from pathlib import Path

# name -> (what the report calls it, Python modules it needs)
ENGINES = {
    "pyincept": ("pyincept", ("pyincept",)),
    "torch": ("torch eager NCHW", ("torch", "torchvision")),
    "torch-cl": ("torch eager channels_last", ("torch", "torchvision")),
    "ort": ("onnxruntime", ("onnxruntime",)),
}
# `--baseline REV` adds pyincept as it was at REV, timed beside today's in the same rounds:
# its package is extracted into the work folder, and its worker imports it from there.
BASELINE = "pyincept-base"
BASELINE_SOURCE = "PYINCEPT_BENCH_BASELINE"      # the worker's environment: the extracted package's folder

PYINCEPT_WEIGHTS = "pyincept.npz"
TORCH_WEIGHTS = "torchvision.pt"
ONNX_MODEL = "inception_v3.onnx"
ONNX_OPSET = 17


def label(name):
    return ENGINES[name][0] if name != BASELINE else "pyincept (baseline)"


def installed(module):
    """Whether `module` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):       # a broken or deliberately hidden package
        return False


def missing(name, workdir=None):
    """Why engine `name` cannot run here (a short phrase), or None when it can."""
    absent = [m for m in ENGINES[name if name != BASELINE else "pyincept"][1] if not installed(m)]
    if absent:
        return f"not installed ({', '.join(absent)})"
    if workdir is not None:
        need = {"pyincept": PYINCEPT_WEIGHTS, BASELINE: PYINCEPT_WEIGHTS, "torch": TORCH_WEIGHTS,
                "torch-cl": TORCH_WEIGHTS, "ort": ONNX_MODEL}[name]
        if not (Path(workdir) / need).exists():
            why = " (exporting it needs torch and torchvision)" if name == "ort" else ""
            return f"no {need}{why}"
    return None


# --- the same weights, three formats ---------------------------------------------------


def torchvision_state_dict(params, model=None):
    """pyincept parameters -> a state dict torchvision's Inception v3 loads with strict=True.

    The inverse of `pyincept.weights.torch_to_pyincept`: conv weights HWIO (R, S, C, K) ->
    OIHW (K, C, R, S) is `transpose(3, 2, 0, 1)`, linear (in, out) -> (out, in) is `.T`,
    batch-norm vectors as they are. Keys torch keeps that hold no weights
    (`num_batches_tracked`) come from the model's own state dict.
    """
    import numpy as np
    import torch

    model = model if model is not None else torchvision_model()
    state = model.state_dict()
    for key, value in params.items():
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        if tuple(state[key].shape) != value.shape:
            raise ValueError(f"{key}: torchvision wants {tuple(state[key].shape)}, converted to {value.shape}")
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def torchvision_model(state=None):
    """torchvision's Inception v3, eval mode, no input transform (pyincept's contract)."""
    import torchvision

    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def prepare(workdir, seed):
    """Write the weights for every engine that can be built here; returns {file: note}."""
    from pyincept.inception_v3 import random_parameters
    from pyincept.weights import save_weights

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    params = random_parameters(seed)
    save_weights(workdir / PYINCEPT_WEIGHTS, params, meta={"random_seed": seed, "made_by": "benchmarks"})
    written = {PYINCEPT_WEIGHTS: f"pyincept.save_weights(random_parameters({seed}))"}
    if missing("torch") is None:
        import torch

        model = torchvision_model(torchvision_state_dict(params))
        torch.save(model.state_dict(), workdir / TORCH_WEIGHTS)
        written[TORCH_WEIGHTS] = "the same weights as a torchvision state dict (OIHW)"
        try:
            export_onnx(model, workdir / ONNX_MODEL)
            written[ONNX_MODEL] = f"torch.onnx.export of that model (opset {ONNX_OPSET}, dynamic batch, dynamo=False)"
        except Exception as e:  # noqa: BLE001 - an exporter failure skips ort, and the report says why
            written[ONNX_MODEL] = f"export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return written


def export_onnx(model, path):
    import torch

    x = torch.zeros(1, 3, 299, 299)
    with torch.no_grad():
        torch.onnx.export(
            model, (x,), str(path), input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
            opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False,
        )


# --- loading an engine ------------------------------------------------------------------


class Runner:
    """An engine ready to run: `forward(native) -> logits (N, 1000) ndarray`, and
    `to_native(x_nhwc)` to prepare its input outside the timed region."""

    def __init__(self, forward, to_native):
        self.forward, self.to_native = forward, to_native

    def __call__(self, x_nhwc):
        return self.forward(self.to_native(x_nhwc))


def load(name, workdir, threads):
    """Load engine `name` from its file in workdir, using `threads` threads."""
    workdir = Path(workdir)
    if name in ("pyincept", BASELINE):
        # Threads: PYINCEPT_NUM_THREADS (numba) and OPENBLAS_NUM_THREADS, set by the caller
        # in the environment before this process started (they are read at import).
        import numpy as np

        if name == BASELINE:
            source = Path(os.environ[BASELINE_SOURCE]).resolve()
            sys.path.insert(0, str(source))                    # before this checkout's own pyincept
        import pyincept

        if name == BASELINE and Path(pyincept.__file__).resolve().parent.parent != source:
            raise RuntimeError(f"the baseline imported {pyincept.__file__}, not the package in {source}")

        model = pyincept.inception_v3(workdir / PYINCEPT_WEIGHTS)
        return Runner(model, lambda x: np.ascontiguousarray(x, dtype=np.float32))
    if name in ("torch", "torch-cl"):
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work already ran
            pass
        model = torchvision_model(torch.load(workdir / TORCH_WEIGHTS, weights_only=True))
        layout = torch.channels_last if name == "torch-cl" else torch.contiguous_format
        model = model.to(memory_format=layout)

        def to_native(x):
            return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=layout)

        def forward(x):
            with torch.inference_mode():
                return model(x).numpy()

        return Runner(forward, to_native)
    if name == "ort":
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(workdir / ONNX_MODEL), options, providers=["CPUExecutionProvider"])

        def to_native(x):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

        return Runner(lambda x: session.run(None, {"x": x})[0], to_native)
    raise ValueError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
