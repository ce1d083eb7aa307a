"""What every network of the family shares: a table of stages run in order, optional
auxiliary heads, named outputs, loading, devices and the two knobs (fusion, algorithm).

A model file (inception_v3.py, googlenet.py) only declares its stages, one per line as in
its paper's table, and which stage each auxiliary head reads; running, tapping, loading
and moving to a device are the same for all of them and live here.

Input is NHWC float32 `(N, H, W, 3)`, exactly the tensor torchvision's network sees with
`transform_input=False`; preprocessing (the recipe that travels with the weights,
registry.py) lives outside the model. Output is logits `(N, num_classes)`.

What it is not: a training framework. Dropout is the identity (inference), and batch
norm is folded into the convolutions when weights load.
"""

import threading

import numpy as np

from .. import fusion, kernels
from ..errors import PyinceptError, WeightsError
from ..io.npz import check_parameters, parameter_mismatch
from ..layers import BasicConv2d, Block, Linear, Taps

ALGORITHMS = ("winograd", "im2col")
SOFTMAX = "softmax"        # a derived output: the classifier's logits through softmax
DEFAULT_SEED = 0


class Network:
    """A network for inference. Subclasses set `stages` (and `aux`) and call `_finish`.

    Class attributes each model sets: `title` ("Inception v3", for messages), `min_size`
    (H, W) the smallest input its stages accept, `feature_layer` (the bottleneck a new top
    layer is trained on) and `classifier` (the stage a retrained head replaces).
    """

    title = "network"
    spec = None            # its registry entry (models/spec.py), set by the model file
    aliases = {}           # other names of some layers ({alias: layer name}), e.g. the TF graph's
    min_size = (1, 1)
    reload = None          # reload(keys=None): the loaded params again, or those of `keys` (`load_parameters`)
    _unloaded_heads = frozenset()   # aux heads whose weights wait for their first tap
    feature_layer = "avgpool"
    classifier = "fc"

    def _finish(self, stages, aux, num_classes, fuse, algorithm):
        """stages: the layers in the order data flows; aux: {name: (head, stage it reads)}."""
        self.stages = stages
        self.aux = dict(aux)
        for part in stages + [head for head, _ in self.aux.values()]:
            setattr(self, part.name, part)              # model.Mixed_5b, model.aux1: torchvision's names
        self.num_classes = num_classes
        self.meta = {}
        self._loading = threading.Lock()
        self.ops = kernels
        self.set_fuse(fuse)
        self.set_algorithm(algorithm)

    # --- the two knobs ----------------------------------------------------------

    def set_fuse(self, fuse):
        """fuse=True: lay fusion.Pointwise1x1 over every module whose 1x1 convs can share one
        GEMM; False: every module runs its branch table in torchvision's order."""
        self._restore_host_weights()                 # a plan is made from the host filters
        for part in self.parts():
            if isinstance(part, Block):
                fusion.fuse(part, fuse)
        self._keep_kernel_forms_only()
        return self

    def set_algorithm(self, algorithm):
        """How the stride-1 3x3, 5x5, 1x3, 3x1, 1x7 and 7x1 convs run: "winograd" (fewer
        multiply-adds, within float rounding of im2col; the CPU's default) or "im2col" (the
        readable path). A backend without Winograd (CUDA) runs im2col either way."""
        if algorithm not in ALGORITHMS:
            raise PyinceptError(f"unknown algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
        self._restore_host_weights()
        for layer in self.conv_layers():
            layer.set_algorithm(algorithm)
        self.algorithm = algorithm
        self._keep_kernel_forms_only()
        return self

    def conv_layers(self):
        """Every BasicConv2d, stages and aux heads alike."""
        return [layer for layer in self.weighted_layers() if isinstance(layer, BasicConv2d)]

    def weighted_layers(self):
        """Every layer with weights (BasicConv2d, Linear), stages and aux heads alike."""
        layers = []
        for part in self.parts():
            layers.extend(part.layers() if isinstance(part, Block) else [part])
        return [layer for layer in layers if isinstance(layer, (BasicConv2d, Linear))]

    def to(self, device):
        """Run on "cpu", "reference" (the plain-NumPy twins) or "cuda": weights move to the
        device once; later calls move only x and the outputs."""
        ops = kernels.backend(device)
        self._restore_host_weights()
        for part in self.parts():
            part.use(ops)
        self.ops = ops
        self._keep_kernel_forms_only()
        return self

    # --- weights held once, in the form the kernels read ----------------------------

    def _keep_kernel_forms_only(self):
        """Where the model can read its weights again (`reload`), drop the host filters that
        a kernel form of their own runs from (loading does it layer by layer: `load(lean=True)`)."""
        if self.reload is not None:
            for layer in self.weighted_layers():
                layer.keep_kernel_form_only()
            for part in self.parts():
                if getattr(part, "plan", None) is not None:
                    part.plan.keep_kernel_form_only()

    def _restore_host_weights(self):
        """Before another algorithm or device: every layer's host filters, reloaded when dropped."""
        if all(layer.holds_host_weight() for layer in self.weighted_layers()):
            return
        params = self.reload()
        for part in self.parts():
            part.load(params)
        self._unloaded_heads = set()

    @property
    def device(self):
        return self.ops.DEVICE

    # --- parameters ---------------------------------------------------------------

    def parts(self):
        """Every stage, each aux head right after the stage it reads (execution order)."""
        parts = []
        for stage in self.stages:
            parts.append(stage)
            parts.extend(head for head, source in self.aux.values() if source == stage.name)
        return parts

    def parameter_shapes(self):
        """{checkpoint key: shape in pyincept layout} for every parameter, aux heads included."""
        shapes = {}
        for part in self.parts():
            shapes.update(part.parameter_shapes())
        return shapes

    def expected_shapes(self, params):
        """parameter_shapes(), less any aux head none of whose keys `params` holds."""
        absent = [name for name, (head, _) in self.aux.items()
                  if not any(key in params for key in head.parameter_shapes())]
        shapes = {}
        for part in self.parts():
            if part.name not in absent:
                shapes.update(part.parameter_shapes())
        return shapes

    def compare_parameters(self, params):
        """(missing keys, unexpected keys, [(key, its shape, the expected shape)]) against `params`."""
        return parameter_mismatch(params, self.expected_shapes(params))

    def load_parameters(self, params, source="weights", meta=None, reload=None, consume=False):
        """Check keys and shapes against the architecture, then fold BN and keep the weights.

        An aux head whose keys are all absent (a state dict saved with aux_logits=False) is
        dropped from the model; one with some keys missing is an error like any other.
        reload: a function that gives the same `params` again (the weight file read anew,
        the seed's random init), or `reload(keys)` those of `keys` only: with it, the model
        keeps each weight only in the form its kernel reads, and reloads the rest when
        `set_algorithm` or `to` needs it; and an aux head (run only when tapped) is loaded
        on its first tap.
        consume: take each stage's arrays out of `params` once it holds its own forms, so
        that the file's copy and the kernels' never all live at once (the loading peak).
        """
        expected = self.expected_shapes(params)
        check_parameters(params, expected, source, self.title)
        for name, (head, _) in list(self.aux.items()):
            if not any(key in expected for key in head.parameter_shapes()):
                del self.aux[name]
                delattr(self, name)
        self.reload = reload
        self._unloaded_heads = set()
        for part in self.parts():
            if reload is not None and part.name in self.aux:
                self._unloaded_heads.add(part.name)       # loaded when first tapped (`run`)
            else:
                part.load(params, lean=reload is not None)
            if consume:
                for key in part.parameter_shapes():
                    params.pop(key, None)
        self.meta = dict(meta or {})
        return self

    def _load_heads(self, names):
        """Load the aux heads among `names` that `load_parameters` left to their first tap:
        only their own keys are read again (`reload`). Once, whichever thread asks first."""
        if not self._unloaded_heads & names:
            return
        with self._loading:
            for name in sorted(self._unloaded_heads & names):
                head = self.aux[name][0]
                head.load(self.reload(list(head.parameter_shapes())), lean=True)
                self._unloaded_heads.discard(name)

    def random_parameters(self, seed=DEFAULT_SEED):
        """Deterministic random weights, for study and benchmarks.

        He-normal convolutions (std sqrt(2 / fan_in)) with identity batch norm keep
        activations O(1) through every convolution; torchvision's truncated normals would
        grow or shrink them by orders of magnitude without calibrated BN statistics.
        """
        rng = np.random.default_rng(seed)
        params = {}
        for key, shape in self.parameter_shapes().items():
            if key.endswith((".bn.weight", ".bn.running_var")):
                value = np.ones(shape)
            elif key.endswith((".bn.bias", ".bn.running_mean")) or (key.endswith(".bias") and len(shape) == 1):
                value = np.zeros(shape)
            else:
                fan_in = int(np.prod(shape[:-1]))                 # HWIO or (in, out): all but the last axis
                gain = 2.0 if ".conv." in key else 1.0
                value = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
            params[key] = value.astype(np.float32)
        return params

    # --- names ------------------------------------------------------------------------

    def resolve(self, name):
        """The layer a name means: itself, or what an alias (`aliases`, with or without a
        TensorFlow tensor's ":0") stands for. Unknown names come back unchanged."""
        bare = name[:-2] if name.endswith(":0") else name
        return self.aliases.get(bare, name)

    def layer_names(self):
        """Every name `run` accepts (aliases aside), in execution order (each aux head after the stage it reads)."""
        names = []
        for part in self.parts():
            if isinstance(part, Block):
                names.extend(part.layer_names())
            names.append(part.name)
        return names

    # --- forward ------------------------------------------------------------------------

    def __call__(self, x):
        """Logits (N, num_classes) for an NHWC float32 batch (N, H, W, 3)."""
        return self.run(x, [self.classifier])[self.classifier]

    def run(self, x, outputs=None, start=None):
        """Run the network as far as needed and return {name: NHWC array} for each name.

        Names are dotted torchvision names: a stage (`Mixed_6e`, `inception4a`, `fc`), a
        layer inside one (`Mixed_5b.branch_pool`, `inception3a.branch2.1`), or an aux head
        (`AuxLogits`, `aux1.fc2`). Stops after the last stage needed. A batch runs in
        micro-batches spread over the device's threads (`kernels.map_batch`); the outputs
        are joined back along the batch axis.

        start: a stage's name; x is then that stage's input (the output of the stage before
        it, say a cached one), and the network runs from there (fine-tuning's forward).
        """
        asked = [self.classifier] if outputs is None else [outputs] if isinstance(outputs, str) else list(outputs)
        first = self._start(start)
        x = self._check_input(x, first)
        known = set(self.layer_names()) | {SOFTMAX}
        layers = {name: self.resolve(name) for name in asked}                  # alias -> layer
        for name, layer in layers.items():
            if layer not in known:
                raise PyinceptError(f"unknown layer {name!r}; `pyincept layers` lists the names")
        wanted = sorted({self.classifier if layer == SOFTMAX else layer for layer in layers.values()})
        self._load_heads({name.split(".")[0] for name in wanted})
        parts = self.ops.map_batch(lambda batch: self._run(x[batch], wanted, first), len(x))
        out = parts[0] if len(parts) == 1 else {n: np.concatenate([part[n] for part in parts]) for n in wanted}
        return {name: self._softmax(out[self.classifier]) if layer == SOFTMAX else out[layer]
                for name, layer in layers.items()}

    def _softmax(self, logits):
        return np.asarray(self.ops.to_host(self.ops.softmax(self.ops.to_device(logits))))

    def _run(self, x, outputs, first=0):
        """`run` for one micro-batch, on the thread that calls it, from stage `first` on."""
        taps = Taps(outputs, to_host=self.ops.to_host)
        x = self.ops.to_device(x)
        stage_names = [s.name for s in self.stages]
        wanted_heads = {n.split(".")[0] for n in outputs} & set(self.aux)
        last = max(stage_names.index(self.aux[top][1] if top in self.aux else top)
                   for top in (n.split(".")[0] for n in outputs))
        for stage in self.stages[first : last + 1]:
            x = stage(x, taps)
            for name in wanted_heads:
                head, source = self.aux[name]
                if source == stage.name:
                    head(x, taps)
        return {name: taps.outputs[name] for name in outputs}

    # --- backward -----------------------------------------------------------------------

    def vjp(self, x, cotangents, params=False, checkpoint="layers", start=None):
        """The gradient of sum(<output, cotangent>) over the given outputs, with respect to x
        (NHWC like x), and with `params` also {checkpoint key: gradient, pyincept's layout}.

        cotangents: {name: array shaped like that output}, any name `run` can tap (aliases
        and `softmax` included). The forward runs as far as the last of them, keeping what
        the backward reads; then the stage table is walked in reverse, each layer's `vjp`
        turning the gradient at its output into one at its input, the aux heads' added to
        the stage they read. Batch norm is frozen (eval mode) and dropout the identity, as
        in inference. checkpoint: "layers" keeps every layer's input (not its im2col
        matrix: conv2d_vjp unfolds again); "blocks" keeps only each module's input and
        replays the module's forward in its backward (less memory, one more forward).
        start: as in `run` (x is that stage's input; dx is then the gradient there, and
        grads cover the stages from it on). Returns dx, or (dx, grads) with params.
        """
        missing = kernels.missing_backward(self.ops)
        if missing:
            raise PyinceptError(f"the {self.device} backend has no backward pass (it lacks {', '.join(missing)})")
        if checkpoint not in ("layers", "blocks"):
            raise PyinceptError(f"checkpoint must be 'layers' or 'blocks', got {checkpoint!r}")
        first = self._start(start)
        x = self._check_input(x, first)
        cots = self._cotangents(cotangents, len(x))
        with self._loading:
            self._restore_host_weights()             # the backward reads the plain filters (kept from now on)
        tops = {self.classifier if name == SOFTMAX else name.split(".")[0] for name in cots}
        heads = tops & set(self.aux)
        names = [s.name for s in self.stages]
        last = max(names.index(self.aux[t][1] if t in heads else t) for t in tops)
        if last < first:
            raise PyinceptError(f"every cotangent is before {start}, where the network starts")
        ops = self.ops
        xs, records = [ops.to_device(x)], {}
        for stage in self.stages[first : last + 1]:            # forward, keeping each stage's input
            if checkpoint == "layers" and isinstance(stage, Block):
                y, records[stage.name] = stage.record(xs[-1])
            else:
                y = stage.direct(xs[-1], Taps())
            xs.append(y)
        grads = {} if params else None
        g = np.zeros(xs[-1].shape, np.float32) if xs[-1].dtype == np.float32 else np.zeros_like(xs[-1])
        for i in range(last, first - 1, -1):                   # backward, the same table in reverse
            stage, x_i, y = self.stages[i], xs[i - first], xs[i - first + 1]
            g = self._add(g, cots, stage.name, y)
            if stage.name == self.classifier and SOFTMAX in cots:
                g = g + ops.softmax_vjp(cots[SOFTMAX], ops.softmax(y))
            for name in sorted(heads):
                head, source = self.aux[name]
                if source == stage.name:
                    g = g + self._head_vjp(head, y, cots, grads)
            inner = {n: c for n, c in cots.items() if n.startswith(stage.name + ".")}
            if isinstance(stage, Block):
                g = stage.vjp(x_i, y, g, grads, inner, records.pop(stage.name, None))
            else:
                g = stage.vjp(x_i, y, g, grads)
        dx = np.asarray(ops.to_host(g))
        return (dx, grads) if params else dx

    def grad(self, x, target, layer=None, start=None):
        """The gradient of sum over images n of out[n, target[n]] with respect to x, where
        out is `layer`'s output (the classifier's logits by default; any (N, K) output or
        NHWC map, its channel summed over the map). target: one index, or one per image.
        start: as in `run`."""
        layer = layer or self.classifier
        x = self._check_input(x, self._start(start))
        shape = self._output_shape(layer, x, start)
        target = np.asarray(target)
        if target.ndim > 1 or target.size not in (1, len(x)) or target.dtype.kind not in "iu":
            raise PyinceptError(f"target must be one index or one per image ({len(x)}), got {target.tolist()}")
        target = np.broadcast_to(target.ravel(), (len(x),))
        if target.min() < 0 or target.max() >= shape[-1]:
            raise PyinceptError(f"target {target.max() if target.max() >= shape[-1] else target.min()} is out of "
                                f"range: {layer} has {shape[-1]} outputs")
        cotangent = np.zeros(shape, np.float32)
        cotangent[np.arange(len(x)), ..., target] = 1.0
        return self.vjp(x, {layer: cotangent}, start=start)

    def _cotangents(self, cotangents, N):
        """{layer name: float32 array}, aliases resolved; an unknown name, one line."""
        if not isinstance(cotangents, dict) or not cotangents:
            raise PyinceptError("cotangents must be a non-empty {layer name: array} dict")
        known = set(self.layer_names()) | {SOFTMAX}
        out = {}
        for name, value in cotangents.items():
            layer = self.resolve(name)
            if layer not in known:
                raise PyinceptError(f"unknown layer {name!r}; `pyincept layers` lists the names")
            value = np.asarray(value, np.float32)
            if layer in out:
                out[layer] = out[layer] + value
            else:
                out[layer] = value
            if value.ndim == 0 or value.shape[0] != N:
                raise PyinceptError(f"the cotangent for {name} is {value.shape}: it needs one row per image ({N})")
        return out

    def _add(self, g, cots, name, y):
        """g plus the cotangent given at `name`'s output y, after checking its shape."""
        if name not in cots:
            return g
        if cots[name].shape != y.shape:
            raise PyinceptError(f"the cotangent for {name} is {cots[name].shape}; {name}'s output is {tuple(y.shape)}")
        return g + cots[name]

    def _head_vjp(self, head, x, cots, grads):
        """An aux head's gradient at the stage it reads, from cotangents at the head or inside it."""
        y, activations = head.record(x)
        g = self._add(np.zeros(y.shape, y.dtype), cots, head.name, y)
        inner = {n: c for n, c in cots.items() if n.startswith(head.name + ".")}
        return head.vjp(x, y, g, grads, inner, activations)

    def _output_shape(self, layer, x, start=None):
        """The shape of `layer`'s output for the batch x: the classifier's is known, any
        other's comes from a forward pass of x's first image."""
        if self.resolve(layer) == self.classifier:
            return len(x), self.num_classes
        return (len(x), *self.run(x[:1], [layer], start=start)[layer].shape[1:])

    def _start(self, start):
        """The index of stage `start` (None: the first)."""
        if start is None:
            return 0
        names = [stage.name for stage in self.stages]
        if start not in names:
            raise PyinceptError(f"start must be one of {self.title}'s stages ({', '.join(names)}), got {start!r}")
        return names.index(start)

    def _check_input(self, x, first=0):
        if self.stages[0].weight is None:
            raise WeightsError("model has no weights loaded")
        x = np.asarray(x)
        if first:                                     # a stage's input: any batch of its maps
            if x.ndim < 2:
                raise PyinceptError(f"{self.stages[first].name}'s input must have a batch axis, got shape {x.shape}")
            return np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[3] != 3:
            raise PyinceptError(f"input must be NHWC (N, H, W, 3), got shape {x.shape}")
        H, W = self.min_size
        if x.shape[1] < H or x.shape[2] < W:
            raise PyinceptError(f"input is {x.shape[1]}x{x.shape[2]}; {self.title} needs at least {H}x{W}")
        return np.ascontiguousarray(x, dtype=np.float32)
