"""The `pyincept` command line.

    pyincept models                      the family: name, paper, parameters, GMACs, input size, weights
    pyincept classify PATH...            top-K ImageNet classes for images and folders
    pyincept retrain DATA_DIR            train a new top layer on folders of images, one per class
    pyincept activations IMAGE --layer N a named layer's activations as a tiled PNG
    pyincept layers                      every named layer: output shape, parameters, MACs
    pyincept metrics INPUT1 [INPUT2]     FID, KID and Inception Score as pytorch-fid, torch-fidelity or clean-fid compute them
    pyincept features PATH... --out DIR  each image's pooled features with its path, as .npz or Parquet shards
    pyincept convert SRC.pth DST.npz     torchvision checkpoint of any registered model -> pyincept weight file
    pyincept compile                     compile every kernel into Numba's on-disk cache (once, at build time)
    pyincept weights fetch               download, verify, convert and cache a model's published weights
    pyincept weights path                print where fetched weights live

Every command that runs a network takes the model from the weight file it is given
(`--weights FILE`, else $PYINCEPT_WEIGHTS, else the fetched weights of `--model`, by
default inception_v3); `--model` picks the network for `--weights random`.

Expected failures (bad files, no network, wrong shapes) print one line,
`pyincept: error: ...`, and exit 1; usage errors exit 2 (argparse). No traceback
is shown for either. `classify` reports each unreadable input and still answers
for every other one; its exit status is 1 when any input failed. `retrain` skips
unreadable images, names them, and trains on the rest.
"""

import argparse
import json
import os
import sys

from .errors import PyinceptError, WeightsError

RANDOM_WEIGHTS = "random"
DEVICES = ("cpu", "reference", "cuda")


def load_model(weights_arg, device="cpu", model=None):
    """The model for --weights FILE, else $PYINCEPT_WEIGHTS, else `model`'s fetched weights, on `device`.

    `--weights random` is the seeded random init of `model` (default inception_v3): for
    study, not for answers. A weight file names its own model; `model`, when given, must agree.
    """
    from .models import registry

    name, path = weights_path(weights_arg, model)
    if path == RANDOM_WEIGHTS:
        return registry.create_model(name, device=device)
    network = registry.load_model(path, device=device)
    if model is not None and network.spec.name != name:
        raise WeightsError(f"{path} holds {network.spec.name} weights, not {name} (drop --model, or pass its weights)")
    return network


def weights_path(weights_arg, model=None):
    """(model name, weight file): --weights FILE, else $PYINCEPT_WEIGHTS, else `model`'s fetched weights."""
    from .io.fetch import weights_path as resolve

    return resolve(weights_arg, model)


def _model_source(args):
    """What each worker loads: the weight file (on Ray, a path every worker can read) and its model's name."""
    from .distributed import ModelSource, check_address

    if args.ray is not None:
        check_address(args.ray)
    name, path = weights_path(args.weights, args.model)
    if path != RANDOM_WEIGHTS:
        path = os.path.abspath(path)
        held = _model_of(path)
        if args.model and held != name:
            raise WeightsError(f"{path} holds {held} weights, not {name} (drop --model, or pass its weights)")
        name = held
    return ModelSource(path, name, args.device)


def _cmd_classify(args):
    from .predict import classify, find_images

    paths = find_images(args.paths)
    if not paths:
        raise PyinceptError("no images found in " + ", ".join(args.paths))
    if args.ray:
        return _classify_on_ray(args, paths)
    head = _load_head(args.head) if args.head else None       # a bad head file fails before any work
    model = load_model(args.weights, args.device, args.model)
    options = {}
    if head is not None:
        from .retrain import attach_head

        _warn_if_other_weights(head, model, args.head)
        attach_head(model, head)
        options = {"labels": head.labels, "preprocessing": head.meta.get("preprocessing")}
    failed = 0
    for result in classify(paths, model, top=args.top, batch_size=args.batch_size, progress=not args.quiet, **options):
        failed += _print_prediction(result, args.json)
    if failed:
        print(f"pyincept: {failed} of {len(paths)} input(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _print_prediction(result, as_json):
    """One input's answer on stdout (its error on stderr): returns 1 if it failed."""
    if as_json:
        print(json.dumps(result.to_json()), flush=True)
    elif result.error is not None:
        print(f"pyincept: error: {result.error}", file=sys.stderr, flush=True)
    else:
        print(result.path)
        for entry in result.top:
            print(f"  {entry['probability']:7.2%}  {entry['label']}  ({entry['index']})")
        sys.stdout.flush()
    return result.error is not None


def _classify_on_ray(args, paths):
    """classify's shards on Ray: the same lines, in the same order, as in one process."""
    from .distributed import run_shards
    from .distributed.tasks import ClassifyTask
    from .predict import Prediction

    if args.head:
        raise PyinceptError("--head does not run on --ray yet: classify with the head in one process")
    task = ClassifyTask(_model_source(args), top=args.top, batch_size=args.batch_size)
    failed = 0
    with _progress(len(paths), args.quiet) as bar:
        for _, shard in run_shards(task, paths, args.shard_size, args.ray, args.workers, args.threads_per_worker,
                                   progress=bar.update):
            for line in shard["json"].tolist():
                answer = json.loads(line)
                failed += _print_prediction(Prediction(answer["path"], answer.get("top", []), answer.get("error")), args.json)
    if failed:
        print(f"pyincept: {failed} of {len(paths)} input(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _progress(total, quiet):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=quiet, leave=False)


def _cmd_features(args):
    from .export import export_features
    from .predict import find_images

    paths = find_images(args.paths)
    if not paths:
        raise PyinceptError("no images found in " + ", ".join(args.paths))
    source = _model_source(args)

    def report(path, reason):
        print(f"pyincept: skipped {reason}", file=sys.stderr, flush=True)

    with _progress(len(paths), args.quiet) as bar:
        summary = export_features(paths, source, args.out, layer=args.layer, shard_size=args.shard_size,
                                  format=args.format, batch_size=args.batch_size, ray=args.ray, workers=args.workers,
                                  threads=args.threads_per_worker, progress=bar.update, on_error=report)
    skipped = f", {summary['skipped']} already there" if summary["skipped"] else ""
    print(f"{args.out}: {summary['images']} image(s) written in {summary['shards'] - summary['skipped']} of "
          f"{summary['shards']} shard(s){skipped}; {len(summary['failed'])} unreadable")
    return 1 if summary["failed"] else 0


def _load_head(path):
    from .retrain import Head

    return Head.load(path)


def _warn_if_other_weights(head, model, path):
    """A head only means something on the features it was trained on: say so when the weights differ."""
    from .retrain import weights_identity

    trained_on, these = (head.meta.get("weights") or {}).get("identity"), weights_identity(model)
    if trained_on and these and trained_on != these:
        print(f"pyincept: warning: {path} was trained on features of weights {trained_on}, "
              f"not these ({these}); its answers will not mean much", file=sys.stderr)


def _cmd_retrain(args):
    from tqdm import tqdm

    from .retrain import find_dataset, format_confusion_matrix, retrain, weights_identity
    from .io.npz import sha256_file

    find_dataset(args.data_dir)                      # a bad folder fails before the network loads
    if args.fine_tune and args.optimizer == "lbfgs":
        raise PyinceptError("--fine-tune trains with sgd or adam, not lbfgs")
    if args.fine_tune and args.augment:
        raise PyinceptError("--augment is for retraining the head alone; --fine-tune reads each image's plain view")
    model = load_model(args.weights, model=args.model)
    weights_file = args.weights or os.environ.get("PYINCEPT_WEIGHTS")
    weights_id = weights_identity(model)
    if weights_id is None and weights_file:          # a weight file whose metadata names no source
        weights_id = "npz-sha256:" + sha256_file(weights_file)
    if args.fine_tune:
        return _fine_tune(args, model, weights_id, weights_file)
    args.out = args.out or "head.npz"
    head, report = retrain(
        args.data_dir, model, epochs=args.epochs or 50, learning_rate=args.learning_rate, batch_size=args.batch_size,
        optimizer=args.optimizer, l2=0.01 if args.l2 is None else args.l2, validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction, seed=args.seed, augment=args.augment, views=args.views,
        cache_dir=args.cache, weights_id=weights_id, weights_file=weights_file and os.path.basename(weights_file),
        progress=not args.quiet, log=lambda line: tqdm.write(line, file=sys.stdout))
    for skipped in report["skipped"]:
        print(f"pyincept: skipped {skipped['error']}", file=sys.stderr)
    split = report["split"]
    if report["test_accuracy"] is None:
        print("test accuracy: no images held out for testing (--test-fraction 0)")
    else:
        print(f"test accuracy {report['test_accuracy']:.1%} on {split['test']} image(s) (loss {report['test_loss']:.4f})")
        print("confusion matrix (rows: true class, columns: predicted class):")
        print(format_confusion_matrix(report["confusion_matrix"], head.labels))
    head.save(args.out)
    augmented = f" + {split['augmented_train_features']} augmented views" if args.augment else ""
    print(f"{args.out}: {len(head.labels)} classes ({', '.join(head.labels)}), trained on {split['train']} image(s)"
          f"{augmented}; bottlenecks computed {report['bottlenecks_computed']}, cached {report['bottlenecks_cached']}")
    return 0


def _fine_tune(args, model, weights_id, weights_file):
    """`retrain --fine-tune STAGE`: train STAGE onward and a new head; write a weight file."""
    from tqdm import tqdm

    from .finetune import fine_tune
    from .retrain import format_confusion_matrix

    out = args.out or "fine_tuned.npz"
    tuned, report = fine_tune(
        args.data_dir, model, args.fine_tune, epochs=args.epochs or 5, learning_rate=args.learning_rate,
        batch_size=args.batch_size, optimizer=args.optimizer, l2=1e-4 if args.l2 is None else args.l2,
        validation_fraction=args.validation_fraction, test_fraction=args.test_fraction, seed=args.seed,
        cache_dir=args.cache, weights_id=weights_id, weights_file=weights_file and os.path.basename(weights_file),
        progress=not args.quiet, log=lambda line: tqdm.write(line, file=sys.stdout))
    for skipped in report["skipped"]:
        print(f"pyincept: skipped {skipped['error']}", file=sys.stderr)
    if report["test_accuracy"] is None:
        print("test accuracy: no images held out for testing (--test-fraction 0)")
    else:
        print(f"test accuracy {report['test_accuracy']:.1%} on {report['split']['test']} image(s) "
              f"(loss {report['test_loss']:.4f})")
        print("confusion matrix (rows: true class, columns: predicted class):")
        print(format_confusion_matrix(report["confusion_matrix"], tuned.labels))
    try:
        tuned.save(out)
    except OSError as e:
        raise PyinceptError(f"{out}: cannot write ({e.strerror or e})") from None
    print(f"{out}: {model.spec.name} fine-tuned from {args.fine_tune} on {report['split']['train']} image(s), "
          f"{len(tuned.labels)} classes ({', '.join(tuned.labels)}); the frozen part's outputs computed "
          f"{report['inputs_computed']}, cached {report['inputs_cached']}; `pyincept classify --weights {out}` reads it")
    return 0


def _cmd_activations(args):
    from .predict import preprocessing_for
    from .preprocess import load_image, preprocess
    from .visualize import activation_grid, save_grid

    model = load_model(args.weights, args.device, args.model)
    if model.resolve(args.layer) not in model.layer_names():
        raise PyinceptError(f"unknown layer {args.layer!r}; `pyincept layers` lists the names")
    x = preprocess(load_image(args.image), **preprocessing_for(model))[None]
    activations = model.run(x, [args.layer])[args.layer][0]
    try:
        grid = activation_grid(activations, cols=args.cols, pad=args.pad, scale=args.scale)
    except ValueError as e:
        raise PyinceptError(str(e)) from None
    try:
        save_grid(grid, args.out)
    except OSError as e:
        raise PyinceptError(f"{args.out}: cannot write ({e.strerror or e})") from None
    shape = "x".join(str(d) for d in activations.shape)
    print(f"{args.layer} ({shape}) -> {args.out} ({grid.shape[1]}x{grid.shape[0]} pixels)")
    return 0


def _cmd_layers(args):
    from .models.registry import get_spec
    from .summary import format_table, layer_table

    name = _model_of(args.weights) if args.weights else get_spec(args.model or "inception_v3").name
    if args.model and args.weights and args.model != name:
        raise WeightsError(f"{args.weights} holds {name} weights, not {args.model}")
    size = tuple(args.size) if args.size else None
    print(format_table(layer_table(size, include_aux=args.aux, model=name)))
    return 0


def _model_of(path):
    """The registered name of the model a weight file holds."""
    from .io.npz import load_weights
    from .models.registry import held_model

    return held_model(*load_weights(path), path)


def _cmd_models(args):
    from .models.registry import MODELS, models
    from .summary import layer_table, totals

    header = ("name", "paper", "params", "GMACs", "input", "weights")
    rows = []
    for name in models():
        spec = MODELS[name]
        t = totals(layer_table(spec.input_size, model=name))
        rows.append((name, spec.paper, f"{t['params'] / 1e6:.2f} M", f"{t['macs'] / 1e9:.2f}",
                     "x".join(map(str, spec.input_size)), ", ".join(f"{w.name} ({w.filename})" for w in spec.weights)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _cmd_metrics(args):
    import warnings

    from .metrics import calculate_metrics

    def report(path, reason):                                # JSON on stdout: the skipped images go to stderr
        if args.json:
            print(f"pyincept: skipped {reason}", file=sys.stderr, flush=True)

    def warn(message, *rest, **kw):
        print(f"pyincept: warning: {message}", file=sys.stderr, flush=True)

    for p in [args.input1, args.input2]:                    # a missing input fails before the network loads
        if p and not os.path.exists(p):
            raise PyinceptError(f"{p}: no such file or folder")
    with warnings.catch_warnings():
        warnings.showwarning = warn
        warnings.simplefilter("default", UserWarning)
        needs_network = not args.ray and any(not _is_stats(p) for p in [args.input1, args.input2] if p)
        model = _fid_model(args) if needs_network else None
        scores = calculate_metrics(
            args.input1, args.input2, fid=args.fid, kid=args.kid, isc=args.isc, model=model,
            protocol=args.protocol, dims=args.dims, batch_size=args.batch_size, kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size, isc_splits=args.isc_splits, save_stats=args.save_stats or (),
            progress=not args.quiet, on_error=report, weights=args.weights if args.ray else None, device=args.device,
            ray=args.ray, workers=args.workers, threads_per_worker=args.threads_per_worker, shard_size=args.shard_size)
    inputs = [scores.pop(key) for key in ("input1", "input2") if key in scores]
    failed = sum(len(i["failed"]) for i in inputs)
    if args.json:
        for n, i in enumerate(inputs, 1):
            scores[f"input{n}_images"], scores[f"input{n}_failed"] = i["images"], len(i["failed"])
        print(json.dumps(scores))
    else:
        for key, value in scores.items():
            print(f"{key}: {value:.7g}")
        for n, i in enumerate(inputs, 1):
            count = "statistics file" if i["images"] is None else f"{i['images']} image(s)"
            skipped = f", {len(i['failed'])} skipped" if i["failed"] else ""
            print(f"input{n}: {i['source']}: {count}{skipped}")
            for path, reason in i["failed"]:
                print(f"  skipped {reason}")
    for path in args.save_stats or ():
        print(f"pyincept: statistics saved to {path}", file=sys.stderr)
    if failed:
        print(f"pyincept: {failed} image(s) could not be read and were left out", file=sys.stderr)
    return 1 if failed else 0


def _fid_model(args):
    from .metrics.api import load_fid_model
    from .models.registry import create_model

    if args.weights == RANDOM_WEIGHTS:
        return create_model("inception_v3_fid", device=args.device, algorithm=args.algorithm or "winograd")
    return load_fid_model(args.weights, args.device, args.algorithm or "winograd")


def _is_stats(path):
    from .metrics.api import is_statistics_file

    return is_statistics_file(path)


def _cmd_convert(args):
    from .io.convert import convert_checkpoint

    meta = convert_checkpoint(args.src, args.dst, model=args.model)
    print(f"converted {args.src} -> {args.dst} ({meta['model']}; sha256 {meta['source_sha256'][:12]}...)")
    return 0


def _cmd_weights_fetch(args):
    from .io.fetch import fetch_weights

    path = fetch_weights(model=args.model, url=args.url, hash_prefix=args.hash_prefix, force=args.force,
                         progress=not args.quiet)
    print(path)
    return 0


def _cmd_compile(args):
    import time

    from .models.registry import compile_kernels

    cache = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.dirname(__file__), "kernels", "__pycache__")
    t0 = time.perf_counter()
    compile_kernels(args.model and [args.model], log=lambda name: print(f"compiled {name}'s kernels", flush=True))
    print(f"Numba cache: {cache} ({time.perf_counter() - t0:.1f} s); later processes load the kernels from there")
    return 0


def _cmd_weights_path(args):
    from . import config

    print(config.cache_dir())
    return 0


def build_parser():
    from .models.registry import models

    parser = argparse.ArgumentParser(prog="pyincept", description="The Inception family in NumPy and Numba.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    names = models()
    model_help = "the network for --weights random or the fetched weights (default inception_v3; a weight file names its own)"

    m = sub.add_parser("models", help="the registered networks: paper, parameters, GMACs, input size, weight sets")
    m.set_defaults(run=_cmd_models)

    c = sub.add_parser("classify", help="top-K ImageNet classes for image files and folders")
    c.add_argument("paths", nargs="+", metavar="PATH", help="image file, or folder searched recursively")
    c.add_argument("--weights", metavar="FILE", help="pyincept .npz (default: $PYINCEPT_WEIGHTS, else the fetched weights)")
    c.add_argument("--top", type=_positive, default=5, metavar="K", help="classes per image (default 5)")
    c.add_argument("--json", action="store_true", help="JSON Lines on stdout: one object per input")
    c.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="images per forward pass (default 8)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--head", metavar="FILE", help="a retrained top layer (.npz from `pyincept retrain`): its classes replace ImageNet's")
    c.add_argument("--model", choices=names, help=model_help)
    c.add_argument("--device", choices=DEVICES, default="cpu", help="where the network runs (reference: the plain-NumPy twins; cuda: the `cuda` extra and an NVIDIA GPU)")
    _ray_options(c, shard_size=256)
    c.set_defaults(run=_cmd_classify)

    r = sub.add_parser("retrain", help="train a new top layer (softmax on the 2048-d bottleneck) on folders of images, one per class")
    r.add_argument("data_dir", metavar="DATA_DIR", help="one sub-folder of images per class; the folder names are the labels")
    r.add_argument("--out", metavar="FILE", help="file to write (default head.npz; with --fine-tune, fine_tuned.npz)")
    r.add_argument("--weights", metavar="FILE", help="pyincept .npz (default: $PYINCEPT_WEIGHTS, else the fetched weights)")
    r.add_argument("--model", choices=names, help=model_help)
    r.add_argument("--epochs", type=_positive, default=None, metavar="N", help="passes over the training set; L-BFGS: iterations (default 50; with --fine-tune 5)")
    r.add_argument("--learning-rate", type=_positive_float, metavar="LR", help="step size (default 0.001; with --fine-tune, adam 0.0001; unused by lbfgs)")
    r.add_argument("--batch-size", type=_positive, default=32, metavar="N", help="examples per sgd/adam step (default 32)")
    r.add_argument("--optimizer", choices=("sgd", "adam", "lbfgs"), default="sgd", help="sgd with momentum, adam, or scipy's L-BFGS-B (default sgd)")
    r.add_argument("--l2", type=_non_negative_float, default=None, metavar="L", help="L2 penalty on the weights (default 0.01; with --fine-tune 1e-4, as weight decay)")
    r.add_argument("--fine-tune", metavar="STAGE", help="also train this stage onward (e.g. Mixed_7c), by the backward pass; writes a weight file (--out, default fine_tuned.npz) that load_model and classify read")
    r.add_argument("--validation-fraction", type=_fraction, default=0.1, metavar="F", help="share of each class held out for validation (default 0.1)")
    r.add_argument("--test-fraction", type=_fraction, default=0.1, metavar="F", help="share of each class held out for the final test (default 0.1)")
    r.add_argument("--seed", type=_integer, default=0, metavar="S", help="seeds the split, the batch order and the augmentation (default 0)")
    r.add_argument("--augment", action="store_true", help="add random crops and horizontal flips of each training image")
    r.add_argument("--views", type=_positive, default=3, metavar="N", help="augmented views per training image with --augment (default 3)")
    r.add_argument("--cache", metavar="DIR", help="bottleneck cache folder (default: the cache folder's bottlenecks/)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(run=_cmd_retrain)

    a = sub.add_parser("activations", help="a named layer's activations for one image, as a tiled PNG")
    a.add_argument("image", metavar="IMAGE")
    a.add_argument("--layer", required=True, metavar="NAME", help="dotted layer name, e.g. Mixed_5b.branch_pool")
    a.add_argument("--weights", metavar="FILE", help="pyincept .npz (default: $PYINCEPT_WEIGHTS, else the fetched weights)")
    a.add_argument("--out", default="grid.png", metavar="FILE", help="PNG to write (default grid.png)")
    a.add_argument("--cols", type=_positive, default=4, metavar="C", help="tiles per row (default 4)")
    a.add_argument("--pad", type=_non_negative, default=1, metavar="P", help="pixels between tiles (default 1)")
    a.add_argument("--scale", type=_positive, default=1, metavar="S", help="upsample the grid S times (default 1)")
    a.add_argument("--model", choices=names, help=model_help)
    a.add_argument("--device", choices=DEVICES, default="cpu", help="where the network runs")
    a.set_defaults(run=_cmd_activations)

    lay = sub.add_parser("layers", help="every named layer: output shape, parameters and multiply-accumulates")
    lay.add_argument("--size", type=_positive, nargs=2, metavar=("H", "W"), help="input size (default: the model's, 299 299 for inception_v3)")
    lay.add_argument("--model", choices=names, help="the network (default inception_v3, or the one --weights holds)")
    lay.add_argument("--weights", metavar="FILE", help="a pyincept .npz: list the layers of the model it holds")
    lay.add_argument("--aux", action="store_true", help="include the auxiliary head")
    lay.set_defaults(run=_cmd_layers)

    mt = sub.add_parser("metrics", help="FID, KID and Inception Score of image folders or statistics files, as the FID tools compute them")
    mt.add_argument("input1", metavar="INPUT1", help="folder of images (searched as classify searches) or statistics .npz")
    mt.add_argument("input2", nargs="?", metavar="INPUT2", help="the second input, for FID and KID")
    mt.add_argument("--fid", action="store_true", help="Frechet Inception Distance (the default with two inputs)")
    mt.add_argument("--kid", action="store_true", help="Kernel Inception Distance (torch-fidelity's subsets)")
    mt.add_argument("--isc", action="store_true", help="Inception Score of INPUT1 (torch-fidelity's splits)")
    mt.add_argument("--protocol", default="pytorch-fid", choices=("pytorch-fid", "torch-fidelity", "clean-fid"),
                    help="whose decoding and resize to 299x299 (default pytorch-fid; README: Metrics)")
    mt.add_argument("--dims", type=int, default=2048, choices=(64, 192, 768, 2048), help="the feature FID and KID use (default 2048)")
    mt.add_argument("--weights", metavar="FILE", help="the FID Inception's .npz (default: $PYINCEPT_WEIGHTS, else the fetched inception_v3_fid)")
    mt.add_argument("--batch-size", type=_positive, default=50, metavar="N", help="images per forward pass (default 50; the results do not depend on it)")
    mt.add_argument("--kid-subsets", type=_positive, default=100, metavar="N", help="KID subsets (default 100)")
    mt.add_argument("--kid-subset-size", type=_positive, default=1000, metavar="N", help="images per KID subset (default 1000)")
    mt.add_argument("--isc-splits", type=_positive, default=10, metavar="N", help="Inception Score splits (default 10)")
    mt.add_argument("--save-stats", nargs="+", metavar="FILE", help="save each image input's FID statistics (.npz, pytorch-fid's format plus the sums), in order")
    mt.add_argument("--json", action="store_true", help="one JSON object on stdout, torch-fidelity's keys")
    mt.add_argument("--algorithm", choices=("winograd", "im2col"), help="how the 3x3-type convolutions run (default winograd)")
    mt.add_argument("--device", choices=DEVICES, default="cpu", help="where the network runs")
    mt.add_argument("--quiet", action="store_true", help="no progress bar")
    _ray_options(mt, shard_size=1000)
    mt.set_defaults(run=_cmd_metrics)

    fe = sub.add_parser("features", help="each image's pooled features (or any layer's) with its path, as .npz or Parquet shards")
    fe.add_argument("paths", nargs="+", metavar="PATH", help="image file, or folder searched recursively (as classify)")
    fe.add_argument("--out", required=True, metavar="DIR", help="folder for manifest.json and shard-NNNNN files (a rerun resumes)")
    fe.add_argument("--layer", metavar="NAME", help="the layer to export, flattened (default: the model's pooled features, e.g. avgpool)")
    fe.add_argument("--format", choices=("npz", "parquet"), default="npz", help="npz (default) or parquet (needs pyarrow)")
    fe.add_argument("--weights", metavar="FILE", help="pyincept .npz (default: $PYINCEPT_WEIGHTS, else the fetched weights)")
    fe.add_argument("--model", choices=names, help=model_help)
    fe.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="images per forward pass (default 8)")
    fe.add_argument("--device", choices=DEVICES, default="cpu", help="where the network runs")
    fe.add_argument("--quiet", action="store_true", help="no progress bar")
    _ray_options(fe, shard_size=1000)
    fe.set_defaults(run=_cmd_features)

    cp = sub.add_parser("compile", help="compile every kernel into Numba's on-disk cache now (for container images: once, at build time)")
    cp.add_argument("--model", choices=names, help="only this model's kernels (default: every registered model)")
    cp.set_defaults(run=_cmd_compile)

    p = sub.add_parser("convert", help="convert a torchvision checkpoint (.pth) of any registered model to a pyincept .npz")
    p.add_argument("src", metavar="SRC", help="torchvision checkpoint, e.g. inception_v3_google-0cc3c7bd.pth or googlenet-1378be20.pth")
    p.add_argument("dst", metavar="DST.npz", help="pyincept weight file to write")
    p.add_argument("--model", choices=names, help="convert as this model (default: recognised from the keys and shapes)")
    p.set_defaults(run=_cmd_convert)

    w = sub.add_parser("weights", help="manage the published weights")
    wsub = w.add_subparsers(dest="weights_command", metavar="ACTION")
    wsub.required = True
    f = wsub.add_parser("fetch", help="download a model's published checkpoint, check its SHA-256, convert it into the cache")
    f.add_argument("--model", choices=names, default="inception_v3", help="whose weights (default inception_v3)")
    f.add_argument("--url", help="download from this URL instead (a mirror)")
    f.add_argument("--hash-prefix", help="expected SHA-256 prefix (hex) of the file at --url")
    f.add_argument("--force", action="store_true", help="download and convert again even if cached")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(run=_cmd_weights_fetch)
    pth = wsub.add_parser("path", help="print the cache folder ($PYINCEPT_CACHE overrides it)")
    pth.set_defaults(run=_cmd_weights_path)
    return parser


def _ray_options(parser, shard_size):
    parser.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster (the `ray` extra): local starts one on "
                        "this machine (127.0.0.1) and stops it after; else an address for ray.init (auto, HOST:PORT, ray://...)")
    parser.add_argument("--workers", type=_positive, metavar="N", help="Ray actors, each loading the model once (default: the cluster's CPUs / threads)")
    parser.add_argument("--threads-per-worker", type=_positive, metavar="T", help="threads per Ray actor (default 2)")
    parser.add_argument("--shard-size", type=_positive, default=shard_size, metavar="N",
                        help=f"images per shard, the unit of work and of retry (default {shard_size})")


def _positive(text):
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text):
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text):
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def _non_negative_float(text):
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _fraction(text):
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {value}")
    return value


def _float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _on_interrupt(signum, frame):
    from .errors import INTERRUPTED

    INTERRUPTED.set()                       # for stop_if_interrupted, should this one be swallowed
    raise KeyboardInterrupt


def main(argv=None):
    import signal
    import threading

    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        from .kernels.gemm import simd

        simd()                              # PYINCEPT_SIMD: a path this CPU cannot run stops here
        return args.run(args)
    except PyinceptError as e:
        print(f"pyincept: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyincept: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
