"""The engines under test, all holding the same weights of one model of the registry
(`--model`, default `inception_v3`; `googlenet` and `inception_v3_fid` too, see `TORCHVISION`).

- `pyincept`: this package, on the `.npz` written by `pyincept.save_weights`, its matrix
  products on the CPU's best micro-kernel (or the one PYINCEPT_SIMD names).
- `pyincept-avx2`: the same, with PYINCEPT_SIMD=avx2 in its process: on a CPU with AVX-512,
  the AVX2 micro-kernel beside the AVX-512 one (same bits, half the vector width). A default
  engine only where AVX-512 runs (`default_engines`); elsewhere AVX2 is what `pyincept` runs.
- `torch`: torchvision's twin (`inception_v3`, `googlenet`) in eager mode, NCHW, under
  `torch.inference_mode()`.
- `torch-cl`: the same model and input in `torch.channels_last` memory format.
- `ort`: ONNX Runtime's CPU execution provider on an ONNX export of that torchvision model
  (graph optimisations on, which folds batch norm into the convolutions as pyincept does).

One set of random weights, `<Network>().random_parameters(seed)` (`Inception3`, `GoogLeNet`),
is written once by `prepare` in each engine's own format: pyincept's `.npz`, a torch state dict
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
    "pyincept-avx2": ("pyincept (PYINCEPT_SIMD=avx2)", ("pyincept",)),
    "torch": ("torch eager NCHW", ("torch", "torchvision")),
    "torch-cl": ("torch eager channels_last", ("torch", "torchvision")),
    "ort": ("onnxruntime", ("onnxruntime",)),
}
# `--baseline REV` adds pyincept as it was at REV, timed beside today's in the same rounds:
# its package is extracted into the work folder, and its worker imports it from there.
BASELINE = "pyincept-base"
BASELINE_SOURCE = "PYINCEPT_BENCH_BASELINE"      # the worker's environment: the extracted package's folder
PYINCEPTS = ("pyincept", "pyincept-avx2", BASELINE)     # the engines that are pyincept, on its .npz
# What an engine's processes get in their environment besides the suite's thread counts:
# pyincept chooses its micro-kernel once per process, from PYINCEPT_SIMD.
ENVIRONMENT = {"pyincept-avx2": {"PYINCEPT_SIMD": "avx2"}}

DEFAULT_MODEL = "inception_v3"
PYINCEPT_WEIGHTS = "pyincept.npz"
TORCH_WEIGHTS = "torchvision.pt"
ONNX_MODEL = "inception_v3.onnx"        # the default model's; onnx_model(name) for any
ONNX_OPSET = 17

# model -> (torchvision.models constructor, its keyword arguments): the torch engines' twin.
# Inception v3 keeps its AuxLogits head (as it always has here); GoogLeNet's aux1/aux2 are
# dropped, and `prepare` leaves their weights out of every engine's file. In eval mode no
# engine runs an aux head, so they only ever cost memory.
# The FID network's twin is pytorch-fid's own: torchvision's Inception3 with its FID blocks
# (`fid_inception_v3` without the download), so it needs pytorch-fid besides (TWIN_MODULES).
TORCHVISION = {
    "inception_v3": ("inception_v3", {"aux_logits": True, "init_weights": False, "transform_input": False}),
    "googlenet": ("googlenet", {"aux_logits": False, "init_weights": False, "transform_input": False}),
    "inception_v3_fid": ("pytorch_fid_inception_v3", {"aux_logits": False, "init_weights": False,
                                                      "transform_input": False}),
}
TWIN_MODULES = {"inception_v3_fid": ("pytorch_fid",)}


def pytorch_fid_inception_v3(weights=None, **kwargs):
    """What pytorch_fid.inception.fid_inception_v3() builds, without its download: the
    metrics benchmark's `fid_network` (no aux head, no input transform, as TORCHVISION's
    keyword arguments say); the weights come from the benchmark's file."""
    from benchmarks.metrics import fid_network

    return fid_network()


def has_twin(model):
    """Whether the torch engines can build `model`'s twin here."""
    return model in TORCHVISION and all(installed(m) for m in TWIN_MODULES.get(model, ()))


def onnx_model(model=DEFAULT_MODEL):
    """The ONNX file's name for `model` (`inception_v3.onnx`, `googlenet.onnx`)."""
    return f"{model}.onnx"


def keeps_aux(model=DEFAULT_MODEL):
    """Whether the engines hold `model`'s aux heads (only where the torch twin keeps them)."""
    return model in TORCHVISION and TORCHVISION[model][1]["aux_logits"]


def pyincept_model(pyincept, model, path):
    """`model` built by package `pyincept` (today's or a baseline's) from the weight file at path.

    Inception v3 goes through `pyincept.inception_v3(path)`, which every revision has (so a
    baseline from before the registry loads too); any other through `create_model`."""
    if model == DEFAULT_MODEL:
        return pyincept.inception_v3(path)
    return pyincept.create_model(model, path)


def label(name):
    return ENGINES[name][0] if name != BASELINE else "pyincept (baseline)"


def default_engines(features=None):
    """The engines a plain run compares: all of ENGINES, less `pyincept-avx2` where the CPU
    has no AVX-512 (there AVX2 is the path `pyincept` runs anyway). `features`: a set of CPU
    feature names as llvmlite spells them (default: this CPU's), as `gemm.runnable_paths` takes."""
    from pyincept.kernels import gemm

    both = "avx512" in gemm.runnable_paths(features)
    return [name for name in ENGINES if name != "pyincept-avx2" or both]


def installed(module):
    """Whether `module` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):       # a broken or deliberately hidden package
        return False


def missing(name, workdir=None, model=DEFAULT_MODEL):
    """Why engine `name` cannot run here on `model` (a short phrase), or None when it can."""
    absent = [m for m in ENGINES[name if name != BASELINE else "pyincept"][1] if not installed(m)]
    if absent:
        return f"not installed ({', '.join(absent)})"
    if name == "pyincept-avx2":
        from pyincept.kernels import gemm

        if "avx2" not in gemm.runnable_paths():
            return f"this CPU cannot run the avx2 path (it runs {', '.join(gemm.runnable_paths())})"
    if workdir is not None:
        need = {**dict.fromkeys(PYINCEPTS, PYINCEPT_WEIGHTS), "torch": TORCH_WEIGHTS, "torch-cl": TORCH_WEIGHTS,
                "ort": onnx_model(model)}[name]
        if not (Path(workdir) / need).exists():
            why = " (exporting it needs torch and torchvision)" if name == "ort" else ""
            return f"no {need}{why}"
    return None


# --- the same weights, three formats ---------------------------------------------------


def torchvision_state_dict(params, model=None, name=DEFAULT_MODEL):
    """pyincept parameters -> a state dict torchvision's twin of model `name` (Inception v3 by
    default) loads with strict=True; `model`: that torch module, if already built.

    The inverse of `pyincept.io.npz.torch_to_pyincept`: conv weights HWIO (R, S, C, K) ->
    OIHW (K, C, R, S) is `transpose(3, 2, 0, 1)`, linear (in, out) -> (out, in) is `.T`,
    batch-norm vectors as they are. Keys torch keeps that hold no weights
    (`num_batches_tracked`) come from the model's own state dict.
    """
    import numpy as np
    import torch

    model = model if model is not None else torchvision_model(name=name)
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


def torchvision_model(state=None, name=DEFAULT_MODEL):
    """torchvision's twin of model `name` (Inception v3 by default), eval mode, no input
    transform (pyincept's contract), aux heads as `TORCHVISION` says."""
    import torchvision

    constructor, kwargs = TORCHVISION[name]
    build = globals().get(constructor) or getattr(torchvision.models, constructor)
    model = build(weights=None, **kwargs)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.eval()


def aux_left_out(model=DEFAULT_MODEL):
    """The aux heads of `model` whose weights no engine holds (none where `keeps_aux`)."""
    from pyincept.models.registry import get_spec

    return [] if keeps_aux(model) else list(get_spec(model).network().aux)


def random_parameters(model, seed):
    """`model`'s `random_parameters(seed)`, less the weights of the heads `aux_left_out` names."""
    from pyincept.models.registry import get_spec

    network = get_spec(model).network()
    params = network.random_parameters(seed)
    for head in aux_left_out(model):
        for key in network.aux[head][0].parameter_shapes():
            del params[key]
    return params


def prepare(workdir, seed, model=DEFAULT_MODEL):
    """Write `model`'s weights for every engine that can be built here; returns {file: note}."""
    from pyincept.io.npz import save_weights
    from pyincept.models.registry import get_spec

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    params = random_parameters(model, seed)
    save_weights(workdir / PYINCEPT_WEIGHTS, params, meta={"random_seed": seed, "made_by": "benchmarks", "model": model})
    written = {PYINCEPT_WEIGHTS: f"pyincept.save_weights(random_parameters({seed}))"}
    if missing("torch") is None and has_twin(model):
        import torch

        model_t = torchvision_model(torchvision_state_dict(params, name=model), name=model)
        torch.save(model_t.state_dict(), workdir / TORCH_WEIGHTS)
        written[TORCH_WEIGHTS] = "the same weights as a torchvision state dict (OIHW)"
        onnx = onnx_model(model)
        try:
            export_onnx(model_t, workdir / onnx, get_spec(model).input_size)
            written[onnx] = f"torch.onnx.export of that model (opset {ONNX_OPSET}, dynamic batch, dynamo=False)"
        except Exception as e:  # noqa: BLE001 - an exporter failure skips ort, and the report says why
            written[onnx] = f"export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return written


def export_onnx(model, path, input_size=(299, 299)):
    import torch

    x = torch.zeros(1, 3, *input_size)
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


def load(name, workdir, threads, model=DEFAULT_MODEL):
    """Load engine `name` holding `model` from its file in workdir, using `threads` threads."""
    workdir = Path(workdir)
    if name in PYINCEPTS:
        # Threads: PYINCEPT_NUM_THREADS, set by the caller in the environment before this
        # process started (read at import). The micro-kernel: PYINCEPT_SIMD, read at the
        # first product, so an engine's own (ENVIRONMENT) holds even when the caller forgot it.
        import numpy as np

        os.environ.update(ENVIRONMENT.get(name, {}))

        if name == BASELINE:
            source = Path(os.environ[BASELINE_SOURCE]).resolve()
            sys.path.insert(0, str(source))                    # before this checkout's own pyincept
        import pyincept

        if name == BASELINE and Path(pyincept.__file__).resolve().parent.parent != source:
            raise RuntimeError(f"the baseline imported {pyincept.__file__}, not the package in {source}")

        net = pyincept_model(pyincept, model, workdir / PYINCEPT_WEIGHTS)
        wanted = ENVIRONMENT.get(name, {}).get("PYINCEPT_SIMD")
        if wanted:
            from pyincept.kernels import gemm

            if gemm.simd().name != wanted:
                raise RuntimeError(f"{name} runs the {gemm.simd().name} micro-kernel, not {wanted}")
        return Runner(net, lambda x: np.ascontiguousarray(x, dtype=np.float32))
    if name in ("torch", "torch-cl"):
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work already ran
            pass
        net = torchvision_model(torch.load(workdir / TORCH_WEIGHTS, weights_only=True), name=model)
        layout = torch.channels_last if name == "torch-cl" else torch.contiguous_format
        net = net.to(memory_format=layout)

        def to_native(x):
            return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=layout)

        def forward(x):
            with torch.inference_mode():
                return net(x).numpy()

        return Runner(forward, to_native)
    if name == "ort":
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(workdir / onnx_model(model)), options, providers=["CPUExecutionProvider"])

        def to_native(x):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

        return Runner(lambda x: session.run(None, {"x": x})[0], to_native)
    raise ValueError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
