"""Fine-tuning: train a network's last modules and a new head, on folders of images.

`retrain` trains only a new top layer on fixed bottlenecks. Fine-tuning lets the gradient
reach further down (Yosinski et al. 2014, "How transferable are features in deep neural
networks?"): the stages from `start` on (say Inception v3's Mixed_7c, then its pool) are
trained with a new K-class head, by the network's own backward pass (`Network.vjp`).

    tuned, report = pyincept.fine_tune("photos/", model, "Mixed_7c", epochs=5)
    tuned.save("tuned.npz")               # a pyincept weight file: load_model and classify read it

Everything before `start` stays frozen, so its output, the input of `start`, is computed
once per image and cached as bottlenecks are, and each step runs only the trainable part.
Batch norm is frozen too: its running statistics stay the checkpoint's (eval mode), and
only its affine weight and bias train, with the convolutions and the head. Dropout is the
identity. The objective is retrain's: the mean softmax cross-entropy, plus L2 on every
trained parameter, given to the optimiser as weight decay (torch's `weight_decay`).

Shape letters: N images, K classes; a batch holds the cached (N, H, W, C) maps.
"""

from datetime import datetime, timezone

import numpy as np

from .errors import PyinceptError
from .io.npz import save_weights
from .predict import preprocessing_for
from .retrain import (
    ADAM_BETAS,
    ADAM_EPSILON,
    CENTER,
    MOMENTUM,
    BottleneckCache,
    check_settings,
    compute_bottlenecks,
    default_cache_dir,
    find_dataset,
    log_softmax,
    split_dataset,
    weights_identity,
)

OPTIMIZERS = ("sgd", "adam")
DEFAULT_LEARNING_RATE = {"sgd": 0.001, "adam": 0.0001}
HEAD_INIT_STD = 0.01               # the new head's weights: normal(0, 0.01), seeded; its bias 0
FROZEN_STATISTICS = ("running_mean", "running_var")


def trainable_keys(model, start):
    """The checkpoint keys fine-tuning from `start` trains: every parameter of that stage and
    those after it (the classifier included), but the batch norms' running statistics."""
    first = model._start(start)
    return [key for stage in model.stages[first:] for key in stage.parameter_shapes()
            if not key.endswith(FROZEN_STATISTICS)]


def cross_entropy(logits, targets):
    """(mean softmax cross-entropy, its gradient with respect to the logits), in float64."""
    log_p = log_softmax(np.asarray(logits, np.float64))
    rows = np.arange(len(logits))
    delta = np.exp(log_p)
    delta[rows, targets] -= 1.0
    return -log_p[rows, targets].mean(), delta / len(logits)


def sgd_step(state, params, grads, learning_rate, l2):
    """torch.optim.SGD with momentum and weight decay: g += l2 p; v = momentum v + g; p -= lr v."""
    for key, g in grads.items():
        g = g + l2 * params[key]
        v = state.get(key)
        state[key] = v = g if v is None else MOMENTUM * v + g
        params[key] = (params[key] - learning_rate * v).astype(np.float32)


def adam_step(state, params, grads, learning_rate, l2):
    """torch.optim.Adam with weight decay (L2 added to the gradient, as torch's Adam does)."""
    beta1, beta2 = ADAM_BETAS
    t = state["t"] = state.get("t", 0) + 1
    for key, g in grads.items():
        g = g + l2 * params[key]
        m, v = state.get(("m", key), 0.0), state.get(("v", key), 0.0)
        state[("m", key)] = m = beta1 * m + (1 - beta1) * g
        state[("v", key)] = v = beta2 * v + (1 - beta2) * g * g
        step = learning_rate * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + ADAM_EPSILON)
        params[key] = (params[key] - step).astype(np.float32)


STEPS = {"sgd": sgd_step, "adam": adam_step}


def train_steps(net, start, inputs, targets, params, keys, batches, *, optimizer="sgd", learning_rate=None, l2=0.0,
                state=None):
    """Optimiser steps, one per batch (an index array into inputs), on `net` from stage `start`.

    params: the checkpoint's arrays ({key: float32}); those of `keys` are trained in place,
    and the stages that hold them are loaded again after each step. Returns the loss of
    each batch before its step. The forward that gives the loss is the one the gradient is
    taken through: `net` runs im2col and unfused (`training_network`).
    """
    learning_rate = DEFAULT_LEARNING_RATE[optimizer] if learning_rate is None else learning_rate
    state = {} if state is None else state
    first = net._start(start)
    losses = []
    for batch in batches:
        x, y = inputs[batch], targets[batch]
        loss, dlogits = cross_entropy(net.run(x, start=start)[net.classifier], y)
        _, grads = net.vjp(x, {net.classifier: dlogits.astype(np.float32)}, params=True, start=start)
        STEPS[optimizer](state, params, {key: grads[key] for key in keys}, learning_rate, l2)
        for stage in net.stages[first:]:
            stage.load(params)
        losses.append(float(loss))
    return losses


def training_network(model, num_classes, params):
    """A copy of `model`'s network for training: `num_classes` outputs, no aux heads, every
    conv direct (im2col) and unfused, so the forward that scores a batch is the one its
    gradient flows through; loaded with `params` (the aux heads' keys dropped)."""
    net = type(model)(num_classes=num_classes, fuse=False, algorithm="im2col").to(model.device)
    heads = tuple(f"{name}." for name in net.aux)
    net.load_parameters({k: v for k, v in params.items() if not k.startswith(heads)}, source="fine-tuning")
    return net


def scores(net, start, inputs, targets, num_classes, batch_size=32):
    """{"accuracy", "loss", "confusion_matrix"} of `net` on cached inputs; None for no images."""
    if len(inputs) == 0:
        return {"accuracy": None, "loss": None, "confusion_matrix": [[0] * num_classes for _ in range(num_classes)]}
    logits = np.concatenate([net.run(inputs[i : i + batch_size], start=start)[net.classifier]
                             for i in range(0, len(inputs), batch_size)])
    loss, _ = cross_entropy(logits, targets)
    predicted = logits.argmax(axis=1)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    return {"accuracy": float(np.mean(predicted == targets)), "loss": float(loss), "confusion_matrix": matrix.tolist()}


class FineTuned:
    """The result: the full parameter set (frozen, trained and the new head), its labels and
    metadata. `save` writes a pyincept weight file, which `load_model` builds for inference."""

    def __init__(self, name, params, labels, meta):
        self.name, self.params, self.labels, self.meta = name, params, tuple(labels), meta

    def save(self, path):
        save_weights(path, self.params, {**self.meta, "model": self.name, "num_classes": len(self.labels),
                                         "labels": list(self.labels)})


def fine_tune(data_dir, model, start, *, epochs=5, learning_rate=None, batch_size=32, optimizer="sgd", l2=1e-4,
              validation_fraction=0.1, test_fraction=0.1, seed=0, cache_dir=None, weights_id=None, weights_file=None,
              preprocessing=None, extract_batch_size=8, progress=False, log=None):
    """Train the stages from `start` on, and a new head, on DATA_DIR's class folders.
    Returns (FineTuned, report); report as `retrain`'s, history per epoch."""
    check_settings(optimizer, OPTIMIZERS, learning_rate, l2, validation_fraction, test_fraction, epochs=epochs,
                   batch_size=batch_size)
    first = model._start(start)
    if first == 0:
        raise PyinceptError(f"fine-tuning from {start} trains the whole network; start at a later stage")
    if model.reload is None:
        raise PyinceptError("fine-tuning needs the model's own parameters again: load it from a weight file or a seed")
    labels, items = find_dataset(data_dir)
    weights_id = weights_id or weights_identity(model)
    if weights_id is None:
        raise PyinceptError("cannot tell which weights the model holds (its metadata has no source_sha256); pass weights_id=")
    settings = dict(preprocessing or preprocessing_for(model))
    frozen = model.stages[first - 1].name                     # its output is the trained part's input
    results, skipped, counts = compute_bottlenecks([path for path, _ in items], lambda digest: [CENTER], model,
                                                   BottleneckCache(cache_dir or default_cache_dir()), weights_id,
                                                   settings, extract_batch_size, progress, layer=frozen)
    readable = [i for i, r in enumerate(results) if r is not None]
    inputs = np.concatenate([results[i] for i in readable])   # (N, H, W, C): the frozen part's output
    targets = np.array([items[i][1] for i in readable], np.int64)
    per_class = np.bincount(targets, minlength=len(labels))
    for k, label in enumerate(labels):
        if per_class[k] < 2:
            raise PyinceptError(f"class {label!r} has {per_class[k]} readable image(s); every class needs at least 2")
    train, validation, test = split_dataset(targets, validation_fraction, test_fraction, seed)

    K = len(labels)
    params = {k: np.asarray(v, np.float32) for k, v in model.reload().items()}
    fc = next(stage for stage in model.stages if stage.name == model.classifier)
    rng = np.random.default_rng((seed, 2))
    params[f"{fc.name}.weight"] = (rng.standard_normal((fc.in_features, K)) * HEAD_INIT_STD).astype(np.float32)
    params[f"{fc.name}.bias"] = np.zeros(K, np.float32)
    net = training_network(model, K, params)
    keys = trainable_keys(net, start)
    state, history, order = {}, [], np.random.default_rng((seed, 1))
    learning_rate = DEFAULT_LEARNING_RATE[optimizer] if learning_rate is None else learning_rate
    for epoch in range(1, epochs + 1):
        shuffled = train[order.permutation(len(train))]
        batches = [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
        losses = train_steps(net, start, inputs, targets, params, keys, batches, optimizer=optimizer,
                             learning_rate=learning_rate, l2=l2, state=state)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if len(validation):
            v = scores(net, start, inputs[validation], targets[validation], K)
            record.update(validation_loss=v["loss"], validation_accuracy=v["accuracy"])
        history.append(record)
        if log is not None:
            log(f"epoch {epoch}/{epochs}  train loss {record['train_loss']:.4f}" + (
                f"  validation loss {record['validation_loss']:.4f} accuracy {record['validation_accuracy']:6.1%}"
                if "validation_loss" in record else ""))
    final = {name: scores(net, start, inputs[s], targets[s], K)
             for name, s in (("train", train), ("validation", validation), ("test", test))}
    hyperparameters = {"start": start, "optimizer": optimizer, "epochs": epochs, "batch_size": batch_size,
                       "learning_rate": learning_rate, "l2": l2, "seed": seed,
                       "validation_fraction": validation_fraction, "test_fraction": test_fraction}
    report = {
        "labels": list(labels), "images_per_class": {label: int(n) for label, n in zip(labels, per_class)},
        "split": {"train": len(train), "validation": len(validation), "test": len(test)},
        "skipped": skipped, "inputs_computed": counts["computed"], "inputs_cached": counts["cached"],
        "history": history, "train_accuracy": final["train"]["accuracy"],
        "validation_accuracy": final["validation"]["accuracy"], "test_accuracy": final["test"]["accuracy"],
        "test_loss": final["test"]["loss"], "confusion_matrix": final["test"]["confusion_matrix"],
        "hyperparameters": hyperparameters, "trained_layers": list(dict.fromkeys(key.rsplit(".", 2)[0] for key in keys)),
        "weights": {"identity": weights_id, "file": weights_file or model.meta.get("source")},
    }
    meta = {
        "base_weights": report["weights"], "trained_layers": report["trained_layers"],
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "preprocessing": settings,
        "hyperparameters": hyperparameters,
        "metrics": {key: report[key] for key in ("train_accuracy", "validation_accuracy", "test_accuracy", "test_loss")},
    }
    heads = tuple(f"{name}." for name in model.aux)
    kept = {k: v for k, v in params.items() if not k.startswith(heads)}   # the aux heads' classes are ImageNet's
    return FineTuned(model.spec.name, kept, labels, meta), report
