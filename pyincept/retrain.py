"""Retrain the top layer: transfer learning on a network's bottleneck features (any registered model).

The parked-car classifier this project grew from did not train Inception v3; it kept the
network and retrained only its last layer (TensorFlow's "How to Retrain Inception's Final
Layer for New Categories", after Donahue et al. 2014, "DeCAF", and Yosinski et al. 2014,
"How transferable are features in deep neural networks?"). Everything up to the global
average pool is a fixed feature extractor: each image becomes D numbers (2048 for v3, 1024
for GoogLeNet), the "bottleneck", computed once and cached on disk. A new softmax layer, D -> K classes,
is then trained on those vectors: multinomial logistic regression, a convex problem that
takes seconds where a forward pass takes a fifth of a second per image.

    head, report = pyincept.retrain("photos/", model, epochs=50, optimizer="adam")
    head.save("head.npz")
    pyincept.attach_head(model, pyincept.Head.load("head.npz"))   # model(x) -> (N, K) logits

The data folder holds one sub-folder per class; the folder names, sorted, are the labels.

What it is not: fine-tuning (that is `fine_tune=`, finetune.py). No gradient reaches the
convolutions, so the head can only be as good as the ImageNet features are for the new
classes. Augmentation (`augment=True`: random crops and horizontal flips) makes extra
bottlenecks for the training images; it does not change the network.

Shape letters: N images, D bottleneck features, K classes.
"""

import hashlib
import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import ImageOps

from . import config, kernels
from .errors import PyinceptError
from .io.files import write_atomically
from .predict import find_images, preprocessing_for
from .preprocess import ImageError, load_image, preprocess

# Each model names its bottleneck (`Network.feature_layer`): the global average pool just
# before fc, 2048-d for Inception v3, 1024-d for GoogLeNet.
HEAD_FORMAT_VERSION = 1
BOTTLENECK_FORMAT_VERSION = 2      # bump to orphan every cached bottleneck (2: keys name the model)
OPTIMIZERS = ("sgd", "adam", "lbfgs")
DEFAULT_LEARNING_RATE = {"sgd": 0.001, "adam": 0.001, "lbfgs": None}   # L-BFGS finds its own step
MOMENTUM = 0.9
ADAM_BETAS, ADAM_EPSILON = (0.9, 0.999), 1e-8
AUGMENTED_VIEWS = 3                # extra views per training image with augment=True
CROP_SCALE = (0.7, 1.0)            # a random crop keeps this fraction of each side
_HEAD_KEYS = {"weight", "bias", "labels", "__format_version__", "__meta__"}


# --- the head -----------------------------------------------------------------------


class Head:
    """A softmax layer over the bottleneck: logits = features @ weight + bias.

    weight (D, K) float32, bias (K,) float32, labels: K class names, meta: a JSON-able dict
    (which weights it was trained on, when, with what, how well).
    """

    def __init__(self, weight, bias, labels, meta=None):
        self.weight = np.ascontiguousarray(weight, np.float32)
        self.bias = np.ascontiguousarray(bias, np.float32)
        self.labels = tuple(str(label) for label in labels)
        self.meta = dict(meta or {})
        K = self.weight.shape[1] if self.weight.ndim == 2 else None
        if K is None or self.bias.shape != (K,) or len(self.labels) != K:
            raise PyinceptError(f"a head needs weight (D, K), bias (K,) and K labels; got weight {self.weight.shape}, "
                                f"bias {self.bias.shape} and {len(self.labels)} labels")

    def logits(self, features):
        """(N, K) logits for bottlenecks (N, D), or the network's (N, 1, 1, D) avgpool output."""
        features = np.asarray(features, np.float32)
        features = features.reshape(len(features), -1)
        if features.shape[1] != self.weight.shape[0]:
            raise PyinceptError(f"features have {features.shape[1]} values each; this head takes {self.weight.shape[0]}")
        return kernels.linear(features, self.weight, self.bias)

    def save(self, path):
        """Write the head as a pickle-free .npz, atomically (a half-written file never has the final name)."""
        arrays = {
            "weight": self.weight,
            "bias": self.bias,
            "labels": np.array(self.labels, dtype=str),        # fixed-width unicode: no pickle needed
            "__format_version__": np.array(HEAD_FORMAT_VERSION, np.int64),
            "__meta__": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        try:
            write_atomically(Path(path), lambda f: np.savez(f, **arrays))
        except OSError as e:
            raise PyinceptError(f"{path}: cannot write ({e.strerror or e})") from None

    @classmethod
    def load(cls, path):
        """Read a head written by `save`; anything else gets a one-line PyinceptError. Never unpickles."""
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an .npz archive")
            with loaded as npz:
                arrays = {k: npz[k] for k in npz.files}
        except FileNotFoundError:
            raise PyinceptError(f"{path}: no such head file") from None
        except IsADirectoryError:
            raise PyinceptError(f"{path}: is a folder, not a head file") from None
        except PermissionError:
            raise PyinceptError(f"{path}: permission denied") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise PyinceptError(f"{path}: not a head file ({_first_line(e)})") from None
        if set(arrays) != _HEAD_KEYS:
            found = ", ".join(sorted(arrays)[:5]) or "nothing"
            raise PyinceptError(f"{path}: not a head file (expected arrays {', '.join(sorted(_HEAD_KEYS))}; found {found})")
        version = arrays["__format_version__"]
        if version.shape != () or version.dtype.kind not in "iu":
            raise PyinceptError(f"{path}: not a head file (__format_version__ is not an integer)")
        if version != HEAD_FORMAT_VERSION:
            raise PyinceptError(f"{path}: head format {version}, this pyincept reads format {HEAD_FORMAT_VERSION}")
        weight, bias, labels = arrays["weight"], arrays["bias"], arrays["labels"]
        if weight.dtype.kind != "f" or bias.dtype.kind != "f" or labels.dtype.kind != "U" or labels.ndim != 1:
            raise PyinceptError(f"{path}: not a head file (weight/bias must be floating point, labels a list of text)")
        try:
            meta = json.loads(str(arrays["__meta__"]))
        except ValueError:
            raise PyinceptError(f"{path}: not a head file (its __meta__ is not JSON)") from None
        try:
            return cls(weight, bias, labels.tolist(), meta if isinstance(meta, dict) else {})
        except PyinceptError as e:
            raise PyinceptError(f"{path}: {e}") from None


def attach_head(model, head):
    """Put `head` in place of the model's fc layer: `model(x)` then gives the head's K logits.

    The head's labels go on the model as `model.labels`. Returns the model.
    """
    fc = next(stage for stage in model.stages if stage.name == model.classifier)
    D, K = head.weight.shape
    if D != fc.in_features:
        raise PyinceptError(f"the head takes {D} features; this model's bottleneck has {fc.in_features}")
    fc.host = (np.ascontiguousarray(head.weight, np.float32), np.ascontiguousarray(head.bias, np.float32))
    fc.use(fc.ops)                                   # onto the device the model runs on
    fc.out_features = model.num_classes = K
    model.labels = head.labels
    if model.reload is not None:                     # a later reload (set_algorithm, set_fuse, to) keeps the head
        reload, ours = model.reload, {f"{fc.name}.weight": fc.host[0], f"{fc.name}.bias": fc.host[1]}

        def reload_with_head(keys=None):
            params = dict(reload(keys))
            params.update({key: value for key, value in ours.items() if keys is None or key in keys})
            return params

        model.reload = reload_with_head
    return model


# --- the loss and its gradient ------------------------------------------------------


def softmax_cross_entropy(weight, bias, features, targets, l2=0.0):
    """The retraining objective and its gradient: (loss, d loss/d weight, d loss/d bias).

    loss = mean over the N examples of -log softmax(features @ weight + bias)[target]
           + l2 / 2 * sum(weight ** 2)        (the bias is not penalised)

    features (N, D), targets (N,) integer class indices, weight (D, K), bias (K,).
    """
    N = len(features)
    rows = np.arange(N)
    log_probabilities = log_softmax(features @ weight + bias)            # (N, K)
    loss = -log_probabilities[rows, targets].mean() + 0.5 * l2 * np.sum(weight * weight)
    # Softmax and cross-entropy together have the simplest of gradients with respect to the
    # logits: predicted probabilities minus the one-hot target (divided by N for the mean).
    delta = np.exp(log_probabilities)
    delta[rows, targets] -= 1.0
    delta /= N
    return loss, features.T @ delta + l2 * weight, delta.sum(axis=0)


def log_softmax(logits):
    """log softmax(logits) per row, (N, K)."""
    # softmax is unchanged by subtracting a constant per row; subtracting the row's
    # maximum keeps exp() from overflowing (the log-sum-exp trick).
    logits = logits - logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def train_softmax(features, targets, num_classes, *, optimizer="sgd", epochs=50, learning_rate=None,
                  batch_size=32, l2=0.01, seed=0, validation=None, progress=False, log=None):
    """Fit a softmax layer to bottlenecks. Returns (weight (D, K) float32, bias (K,) float32, history).

    optimizer: "sgd" (mini-batch, momentum 0.9), "adam" (Kingma & Ba 2015), or "lbfgs"
    (full batch, scipy's L-BFGS-B; `epochs` is then its iteration limit). An epoch is one
    pass over the training set in a seeded random order. validation: optional
    (features, targets) scored after every epoch. history: one dict per epoch
    (train and validation cross-entropy and accuracy, without the L2 term).
    log: called with one line of text per epoch.

    The features are standardised (each of the D to mean 0, variance 1 over the training
    set) before training, and the result is folded back into a layer over the raw
    features. Why: the bottlenecks are ReLU outputs, all positive, so they share one big
    mean direction; gradient descent's speed depends on how round the loss surface is,
    and centring and scaling makes it much rounder, so one learning rate suits any
    network's features. The L2 penalty applies to the weights of the standardised features.
    """
    if optimizer not in OPTIMIZERS:
        raise PyinceptError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATE[optimizer]
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    y = np.asarray(targets, np.int64)
    D, K = x.shape[1], num_classes
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0                 # a feature that never varies (a dead ReLU) stays 0

    def standardise(f):
        return (np.asarray(f, np.float64).reshape(len(f), -1) - mean) / scale

    x = standardise(x)
    validation = None if validation is None or len(validation[0]) == 0 else (standardise(validation[0]), np.asarray(validation[1]))

    history = []

    def end_of_epoch(weight, bias):
        record = {"epoch": len(history) + 1, **_scores(weight, bias, x, y, "train")}
        if validation is not None:
            record.update(_scores(weight, bias, *validation, "validation"))
        history.append(record)
        bar.update(1)
        if log is not None:
            log(_epoch_line(record, epochs))

    from tqdm import tqdm

    weight, bias = np.zeros((D, K)), np.zeros(K)     # the problem is convex: any start reaches the optimum
    with tqdm(total=epochs, unit="epoch", desc="training", disable=not progress, leave=False) as bar:
        if optimizer == "lbfgs":
            weight, bias = _lbfgs(weight, bias, x, y, l2, epochs, end_of_epoch)
        else:
            step = _sgd_step if optimizer == "sgd" else _adam_step
            state = {}
            rng = np.random.default_rng((seed, 1))
            for _ in range(epochs):
                order = rng.permutation(len(x))
                for start in range(0, len(x), batch_size):
                    batch = order[start : start + batch_size]
                    _, grad_w, grad_b = softmax_cross_entropy(weight, bias, x[batch], y[batch], l2)
                    weight, bias = step(state, (weight, bias), (grad_w, grad_b), learning_rate)
                end_of_epoch(weight, bias)

    # Fold the standardisation into the layer: (f - mean) / scale @ W + b = f @ (W / scale) + (b - (mean / scale) @ W).
    raw_weight = weight / scale[:, None]
    raw_bias = bias - (mean / scale) @ weight
    return raw_weight.astype(np.float32), raw_bias.astype(np.float32), history


def _sgd_step(state, params, grads, learning_rate):
    """Momentum (Polyak 1964): a velocity that remembers past gradients smooths the noisy mini-batch steps."""
    velocity = state.setdefault("velocity", [np.zeros_like(p) for p in params])
    for v, g in zip(velocity, grads):
        v *= MOMENTUM
        v -= learning_rate * g
    return tuple(p + v for p, v in zip(params, velocity))


def _adam_step(state, params, grads, learning_rate):
    """Adam: per-parameter steps scaled by running averages of the gradient and its square, bias-corrected."""
    beta1, beta2 = ADAM_BETAS
    t = state["t"] = state.get("t", 0) + 1
    m = state.setdefault("m", [np.zeros_like(p) for p in params])
    v = state.setdefault("v", [np.zeros_like(p) for p in params])
    out = []
    for p, g, m_i, v_i in zip(params, grads, m, v):
        m_i *= beta1
        m_i += (1 - beta1) * g
        v_i *= beta2
        v_i += (1 - beta2) * g * g
        m_hat, v_hat = m_i / (1 - beta1**t), v_i / (1 - beta2**t)
        out.append(p - learning_rate * m_hat / (np.sqrt(v_hat) + ADAM_EPSILON))
    return tuple(out)


def _lbfgs(weight, bias, x, y, l2, iterations, end_of_iteration):
    """Full-batch L-BFGS (Liu & Nocedal 1989) through scipy: a quasi-Newton method, no learning rate."""
    from scipy.optimize import minimize

    D, K = weight.shape

    def unpack(theta):
        return theta[: D * K].reshape(D, K), theta[D * K :]

    def objective(theta):
        loss, grad_w, grad_b = softmax_cross_entropy(*unpack(theta), x, y, l2)
        return loss, np.concatenate([grad_w.ravel(), grad_b])

    result = minimize(objective, np.concatenate([weight.ravel(), bias]), jac=True, method="L-BFGS-B",
                      callback=lambda xk: end_of_iteration(*unpack(xk)), options={"maxiter": iterations})
    return unpack(result.x)


def _scores(weight, bias, x, y, name):
    loss, _, _ = softmax_cross_entropy(weight, bias, x, y)
    accuracy = float(np.mean(np.argmax(x @ weight + bias, axis=1) == y))
    return {f"{name}_loss": float(loss), f"{name}_accuracy": accuracy}


def _epoch_line(record, epochs):
    line = (f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  "
            f"train loss {record['train_loss']:.4f} accuracy {record['train_accuracy']:6.1%}")
    if "validation_loss" in record:
        line += f"  validation loss {record['validation_loss']:.4f} accuracy {record['validation_accuracy']:6.1%}"
    return line


# --- the data: class folders, a deterministic split -----------------------------------


def find_dataset(data_dir):
    """DATA_DIR/<label>/<images...> -> (labels sorted, [(path, class index)], in label then path order).

    Hidden folders are skipped; images are found as `pyincept classify` finds them.
    Raises PyinceptError when there is no such folder, fewer than two classes, or a class
    with fewer than two image files.
    """
    root = Path(data_dir)
    if not root.exists():
        raise PyinceptError(f"{data_dir}: no such folder")
    if not root.is_dir():
        raise PyinceptError(f"{data_dir}: not a folder (expected one sub-folder of images per class)")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise PyinceptError(f"{data_dir}: no class folders (expected one sub-folder of images per class)")
    if len(labels) == 1:
        raise PyinceptError(f"{data_dir}: only one class ({labels[0]!r}); a classifier needs at least two class folders")
    items = []
    for k, label in enumerate(labels):
        paths = find_images([root / label])
        if len(paths) < 2:
            raise PyinceptError(f"{root / label}: class {label!r} has {len(paths)} image(s); every class needs at least 2")
        items.extend((path, k) for path in paths)
    return labels, items


def check_settings(optimizer, optimizers, learning_rate, l2, validation_fraction, test_fraction, **counts):
    """A one-line PyinceptError for a training setting out of range; counts (epochs=...,
    batch_size=...) must each be at least 1."""
    if optimizer not in optimizers:
        raise PyinceptError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(optimizers)}")
    for name, value in counts.items():
        if value < 1:
            raise PyinceptError(f"{name.replace('_', ' ')} must be at least 1, got {value}")
    if learning_rate is not None and not learning_rate > 0:
        raise PyinceptError(f"learning rate must be above 0, got {learning_rate}")
    if not l2 >= 0:
        raise PyinceptError(f"L2 strength must be 0 or more, got {l2}")
    check_fractions(validation_fraction, test_fraction)


def check_fractions(validation_fraction, test_fraction):
    for name, fraction in (("validation", validation_fraction), ("test", test_fraction)):
        if not 0 <= fraction < 1:
            raise PyinceptError(f"the {name} fraction must be at least 0 and less than 1, got {fraction}")
    if validation_fraction + test_fraction >= 1:
        raise PyinceptError("the validation and test fractions together must leave images to train on")


def split_dataset(targets, validation_fraction=0.1, test_fraction=0.1, seed=0):
    """Indices (train, validation, test), stratified: each class is shuffled and cut on its own.

    A class of n images gives round(n * fraction) images to each held-out set, at least
    one when the fraction is above zero, but never so many that the class has nothing to
    train on (validation gives way first, then test). The same seed gives the same split.
    """
    check_fractions(validation_fraction, test_fraction)
    targets = np.asarray(targets)
    rng = np.random.default_rng((seed, 0))
    train, validation, test = [], [], []
    for k in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == k))
        n = len(members)
        n_test, n_validation = (max(1, round(n * f)) if f > 0 else 0 for f in (test_fraction, validation_fraction))
        n_test = min(n_test, n - 1)
        n_validation = min(n_validation, n - 1 - n_test)
        test.extend(members[:n_test])
        validation.extend(members[n_test : n_test + n_validation])
        train.extend(members[n_test + n_validation :])
    return tuple(np.sort(np.array(s, np.int64)) for s in (train, validation, test))


# --- bottlenecks: computed once, cached by content ----------------------------------


def weights_identity(model):
    """A short string naming the weights a model holds, from its metadata; None if it has none.

    Converted weights carry the SHA-256 of the checkpoint they came from; the random
    init carries its seed.
    """
    meta = model.meta or {}
    if meta.get("source_sha256"):
        return f"sha256:{meta['source_sha256']}"
    if "random_seed" in meta:
        return f"random-seed-{meta['random_seed']}"
    return None


def bottleneck_key(image_sha256, weights_id, view, preprocessing, model="inception_v3", layer="avgpool"):
    """The cache key of one bottleneck: a SHA-256 over everything that determines it.

    The image's bytes (not its name: a changed file is a new key, a renamed one is not),
    the model and its weights, the augmentation view, the preprocessing settings and the layer.
    """
    material = {
        "format": BOTTLENECK_FORMAT_VERSION,
        "image_sha256": image_sha256,
        "weights": weights_id,
        "model": model,
        "layer": layer,
        "view": view,
        "preprocessing": preprocessing,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class BottleneckCache:
    """One `.npy` per bottleneck, under folder/<first 2 hex digits>/<key>.npy.

    Read with allow_pickle=False; written atomically, so an interrupted run leaves no
    half-written file behind. A file that does not load as a (D,) float32 vector is a miss.
    """

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, key):
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key, width):
        try:
            vector = np.load(self.path(key), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return vector if vector.shape == (width,) and vector.dtype == np.float32 else None

    def put(self, key, vector):
        try:
            write_atomically(self.path(key), lambda f: np.save(f, np.asarray(vector, np.float32)))
        except OSError as e:
            raise PyinceptError(f"{self.folder}: cannot write the bottleneck cache ({e.strerror or e})") from None


def default_cache_dir():
    return Path(config.cache_dir()) / "bottlenecks"


CENTER = {"crop": None, "flip": False}     # the plain view: preprocessing's own centre crop


def augmented_views(image_sha256, seed, count):
    """`count` random views of one image: a crop keeping CROP_SCALE of each side, flipped half the time.

    Drawn from (seed, the image's content), so an image's views do not depend on which
    other images are in the folder. Crops are fractions of the width and height, rounded,
    so each view has a short, exact description for its cache key.
    """
    rng = np.random.default_rng((seed, 2, int(image_sha256[:16], 16)))
    views = []
    for _ in range(count):
        s = rng.uniform(*CROP_SCALE)
        left, top = rng.uniform(0, 1 - s, size=2)
        crop = [round(float(v), 4) for v in (left, top, left + s, top + s)]
        views.append({"crop": crop, "flip": bool(rng.integers(2))})
    return views


def render_view(image, view):
    """The PIL image for a view: crop (fractions of width and height), then mirror."""
    if view["crop"] is not None:
        w, h = image.size
        left, top, right, bottom = view["crop"]
        image = image.crop((round(left * w), round(top * h), max(round(right * w), 1), max(round(bottom * h), 1)))
    return ImageOps.mirror(image) if view["flip"] else image


def compute_bottlenecks(paths, views_of, model, cache, weights_id, preprocessing, batch_size=8, progress=False,
                        layer=None):
    """Bottlenecks of each image's views: from the cache, else by running the network.
    layer: whose output they are (default the model's `feature_layer`, flattened to its D
    values; another layer keeps its map's shape: fine-tuning caches the frozen part's output).

    views_of(image_sha256) -> the list of views wanted for that image (`CENTER`, or
    `augmented_views`). Each file is read once: its bytes are hashed for the cache key
    and, only if a view is missing, decoded.

    Returns (results, skipped, counts): results[i] is a (views, D) float32 array (views and
    the layer's shape for another layer), or None
    when paths[i] could not be read; skipped the [{"path", "error"}] of those; counts
    {"computed": forward passes made, "cached": bottlenecks found in the cache}.
    """
    from tqdm import tqdm

    if layer is None or layer == model.feature_layer:
        layer = model.feature_layer
        shape = (next(stage for stage in model.stages if stage.name == model.classifier).in_features,)
    else:
        size = preprocessing.get("crop_size", model.spec.input_size[0])
        shape = model.run(np.zeros((1, size, size, 3), np.float32), [layer])[layer].shape[1:]
    D = int(np.prod(shape))
    results, skipped, pending = [None] * len(paths), [], []     # pending: (image i, view j, key, pixels)
    counts = {"computed": 0, "cached": 0}

    def flush():
        if pending:
            x = np.stack([pixels for *_, pixels in pending])
            features = model.run(x, [layer])[layer].reshape(len(x), D)
            for (i, j, key, _), vector in zip(pending, features):
                cache.put(key, vector)
                results[i][j] = vector.reshape(shape)
            counts["computed"] += len(pending)
            pending.clear()

    with tqdm(total=len(paths), unit="img", desc="bottlenecks", disable=not progress, leave=False) as bar:
        for i, path in enumerate(paths):
            try:
                data = _read_bytes(path)
                digest = hashlib.sha256(data).hexdigest()
                views = views_of(digest)
                keys = [bottleneck_key(digest, weights_id, view, preprocessing, model.spec.name, layer) for view in views]
                vectors = [cache.get(key, D) for key in keys]
                missing = [j for j, v in enumerate(vectors) if v is None]
                image = _decode(data, path) if missing else None
                rendered = [(j, preprocess(render_view(image, views[j]), **preprocessing)) for j in missing]
            except ImageError as e:
                skipped.append({"path": str(path), "error": str(e)})
                bar.update(1)
                continue
            results[i] = np.zeros((len(views), *shape), np.float32)
            for j, vector in enumerate(vectors):
                if vector is not None:
                    results[i][j] = vector.reshape(shape)
            counts["cached"] += len(views) - len(missing)
            pending.extend((i, j, keys[j], pixels) for j, pixels in rendered)
            if len(pending) >= batch_size:
                flush()
            bar.update(1)
        flush()
    return results, skipped, counts


# --- the whole job --------------------------------------------------------------------


def retrain(data_dir, model, *, epochs=50, learning_rate=None, batch_size=32, optimizer="sgd", l2=0.01,
            validation_fraction=0.1, test_fraction=0.1, seed=0, augment=False, views=AUGMENTED_VIEWS,
            cache_dir=None, weights_id=None, weights_file=None, preprocessing=None, extract_batch_size=8,
            progress=False, log=None, fine_tune=None):
    """Train a new softmax layer on the bottlenecks of DATA_DIR's images. Returns (Head, report).

    fine_tune: a stage's name ("Mixed_7c"): train that stage onward too, with the new head,
    by the backward pass (`finetune.fine_tune`, which says how); returns (FineTuned, report).

    data_dir: one sub-folder per class. model: any registered network (kept as it is). The images
    are split per class into train / validation / test (`split_dataset`); the head is
    trained on the train bottlenecks (plus `views` augmented views of each training image
    when `augment`), scored on validation after every epoch and on test once at the end.
    Unreadable images are skipped and listed in report["skipped"].

    weights_id: the cache's name for the model's weights (default: `weights_identity(model)`).
    weights_file: the weight file's name, recorded in the head's metadata.
    cache_dir: where bottlenecks are cached (default: `config.cache_dir()/bottlenecks`).
    preprocessing: settings for `preprocess` (default: the model's, as `classify` uses).
    log: called with each line of the training log (per-epoch scores).

    report: a JSON-able dict: labels, images_per_class, split sizes, skipped, bottlenecks
    computed and cached, history (per epoch), test accuracy and loss, the confusion matrix
    (rows: true class, columns: predicted), hyperparameters, weights.
    """
    if fine_tune is not None:
        from .finetune import fine_tune as tune

        if augment:
            raise PyinceptError("augmentation is for retraining the head alone; fine-tuning reads each image's plain view")
        return tune(data_dir, model, fine_tune, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                    optimizer=optimizer, l2=l2, validation_fraction=validation_fraction, test_fraction=test_fraction,
                    seed=seed, cache_dir=cache_dir, weights_id=weights_id, weights_file=weights_file,
                    preprocessing=preprocessing, extract_batch_size=extract_batch_size, progress=progress, log=log)
    check_settings(optimizer, OPTIMIZERS, learning_rate, l2, validation_fraction, test_fraction,
                   epochs=epochs, batch_size=batch_size, views=views)
    labels, items = find_dataset(data_dir)
    weights_id = weights_id or weights_identity(model)
    if weights_id is None:
        raise PyinceptError("cannot tell which weights the model holds (its metadata has no source_sha256); pass weights_id=")
    settings = dict(preprocessing or preprocessing_for(model))
    cache = BottleneckCache(cache_dir or default_cache_dir())

    # Every image's plain view first: which images are readable decides the split.
    results, skipped, counts = compute_bottlenecks([path for path, _ in items], lambda digest: [CENTER], model, cache,
                                                   weights_id, settings, extract_batch_size, progress)
    readable = [i for i, r in enumerate(results) if r is not None]
    paths = [items[i][0] for i in readable]
    features = np.concatenate([results[i] for i in readable]) if readable else np.zeros((0, 0), np.float32)
    targets = np.array([items[i][1] for i in readable], np.int64)
    per_class = np.bincount(targets, minlength=len(labels))
    class_of = {str(path): k for path, k in items}
    for k, label in enumerate(labels):
        if per_class[k] < 2:
            lost = [Path(s["path"]).name for s in skipped if class_of[s["path"]] == k]
            raise PyinceptError(f"class {label!r} has {per_class[k]} readable image(s); every class needs at least 2"
                                + (f" (unreadable: {', '.join(lost)})" if lost else ""))
    train, validation, test = split_dataset(targets, validation_fraction, test_fraction, seed)

    # Augmented views are for training only: validation and test measure the plain pictures.
    train_features, train_targets = features[train], targets[train]
    if augment:
        extra, more_skipped, more = compute_bottlenecks(
            [paths[i] for i in train], lambda digest: augmented_views(digest, seed, views),
            model, cache, weights_id, settings, extract_batch_size, progress)
        skipped += more_skipped
        counts = {key: counts[key] + more[key] for key in counts}
        kept = [(r, targets[i]) for r, i in zip(extra, train) if r is not None]
        train_features = np.concatenate([train_features] + [r for r, _ in kept])
        train_targets = np.concatenate([train_targets] + [np.full(len(r), t) for r, t in kept])

    hyperparameters = {
        "optimizer": optimizer, "epochs": epochs, "batch_size": batch_size, "l2": l2, "seed": seed,
        "learning_rate": learning_rate if learning_rate is not None else DEFAULT_LEARNING_RATE[optimizer],
        "validation_fraction": validation_fraction, "test_fraction": test_fraction,
        "augment": bool(augment), "views": views if augment else 0,
    }
    weight, bias, history = train_softmax(
        train_features, train_targets, len(labels), optimizer=optimizer, epochs=epochs,
        learning_rate=learning_rate, batch_size=batch_size, l2=l2, seed=seed,
        validation=(features[validation], targets[validation]), progress=progress, log=log)
    head = Head(weight, bias, labels)

    # The final scores use the saved float32 head, exactly as `classify --head` will.
    scores = {name: evaluate(head, features[s], targets[s]) for name, s in
              (("train", train), ("validation", validation), ("test", test))}
    report = {
        "labels": list(labels),
        "images_per_class": {label: int(n) for label, n in zip(labels, per_class)},
        "split": {"train": len(train), "validation": len(validation), "test": len(test),
                  "augmented_train_features": len(train_features) - len(train)},
        "test_paths": [paths[i] for i in test],
        "skipped": skipped,
        "bottlenecks_computed": counts["computed"],
        "bottlenecks_cached": counts["cached"],
        "history": history,
        "train_accuracy": scores["train"]["accuracy"],
        "validation_accuracy": scores["validation"]["accuracy"],
        "test_accuracy": scores["test"]["accuracy"],
        "test_loss": scores["test"]["loss"],
        "confusion_matrix": scores["test"]["confusion_matrix"],
        "hyperparameters": hyperparameters,
        "weights": {"identity": weights_id, "file": weights_file or model.meta.get("source")},
    }
    head.meta = {
        "weights": report["weights"],
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.spec.name,
        "feature_layer": model.feature_layer,
        "preprocessing": settings,
        "hyperparameters": hyperparameters,
        "metrics": {key: report[key] for key in ("train_accuracy", "validation_accuracy", "test_accuracy",
                                                 "test_loss", "confusion_matrix")},
        "split": report["split"],
        "images_per_class": report["images_per_class"],
        "skipped": [s["path"] for s in skipped],
    }
    return head, report


def evaluate(head, features, targets):
    """{"accuracy", "loss", "confusion_matrix"} of a head on bottlenecks; None scores for no examples.

    confusion_matrix[i][j] counts the images of class i predicted as class j.
    """
    K = len(head.labels)
    if len(features) == 0:
        return {"accuracy": None, "loss": None, "confusion_matrix": np.zeros((K, K), int).tolist()}
    logits = head.logits(features).astype(np.float64)
    loss = -log_softmax(logits)[np.arange(len(targets)), targets].mean()
    predicted = np.argmax(logits, axis=1)
    confusion = np.zeros((K, K), np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    return {"accuracy": float(np.mean(predicted == targets)), "loss": float(loss), "confusion_matrix": confusion.tolist()}


def format_confusion_matrix(matrix, labels):
    """A table: one row per true class, one column per predicted class."""
    width = max(len(str(n)) for row in matrix for n in row)
    first = max(len("true \\ predicted"), *(len(label) for label in labels))
    columns = [max(width, len(label)) for label in labels]
    lines = ["true \\ predicted".ljust(first) + "".join(f"  {label:>{w}}" for label, w in zip(labels, columns))]
    for label, row in zip(labels, matrix):
        lines.append(label.ljust(first) + "".join(f"  {n:>{w}}" for n, w in zip(row, columns)))
    return "\n".join(lines)


# --- files ----------------------------------------------------------------------------


def _read_bytes(path):
    """A file's bytes, or an ImageError naming it (as `load_image` would)."""
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None


def _decode(data, path):
    """`load_image` on bytes already read (so the hashed bytes are the decoded ones), errors naming the file."""
    try:
        return load_image(data)
    except ImageError as e:
        raise ImageError(str(e).replace("<bytes>", str(path), 1)) from None


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


__all__ = [
    "Head",
    "attach_head",
    "bottleneck_key",
    "evaluate",
    "find_dataset",
    "retrain",
    "softmax_cross_entropy",
    "split_dataset",
    "train_softmax",
    "weights_identity",
]
