"""The `pyincept` command line.

    pyincept classify PATH...            top-K ImageNet classes for images and folders
    pyincept activations IMAGE --layer N a named layer's activations as a tiled PNG
    pyincept layers                      every named layer: output shape, parameters, MACs
    pyincept convert SRC.pth DST.npz     torchvision checkpoint -> pyincept weight file
    pyincept weights fetch               download, verify, convert and cache the published weights
    pyincept weights path                print where fetched weights live

Expected failures (bad files, no network, wrong shapes) print one line,
`pyincept: error: ...`, and exit 1; usage errors exit 2 (argparse). No traceback
is shown for either. `classify` reports each unreadable input and still answers
for every other one; its exit status is 1 when any input failed.
"""

import argparse
import json
import os
import sys

from .errors import PyinceptError, WeightsError

RANDOM_WEIGHTS = "random"


def load_model(weights_arg):
    """The model for --weights FILE, else $PYINCEPT_WEIGHTS, else the fetched cache.

    `--weights random` is the seeded random init: for study, not for answers.
    """
    from .fetch import default_weights_path
    from .inception_v3 import inception_v3

    path = weights_arg or os.environ.get("PYINCEPT_WEIGHTS") or default_weights_path()
    if path is None:
        raise WeightsError(
            "no weights: run `pyincept weights fetch` (needs the internet), or pass --weights FILE.npz "
            "or set PYINCEPT_WEIGHTS (make the file with `pyincept convert inception_v3_google-0cc3c7bd.pth FILE.npz`)"
        )
    return inception_v3(None if str(path) == RANDOM_WEIGHTS else path)


def _cmd_classify(args):
    from .predict import classify, find_images

    paths = find_images(args.paths)
    if not paths:
        raise PyinceptError("no images found in " + ", ".join(args.paths))
    model = load_model(args.weights)
    failed = 0
    for result in classify(paths, model, top=args.top, batch_size=args.batch_size, progress=not args.quiet):
        failed += result.error is not None
        if args.json:
            print(json.dumps(result.to_json()), flush=True)
        elif result.error is not None:
            print(f"pyincept: error: {result.error}", file=sys.stderr, flush=True)
        else:
            print(result.path)
            for entry in result.top:
                print(f"  {entry['probability']:7.2%}  {entry['label']}  ({entry['index']})")
            sys.stdout.flush()
    if failed:
        print(f"pyincept: {failed} of {len(paths)} input(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _cmd_activations(args):
    from .predict import preprocessing_for
    from .preprocess import load_image, preprocess
    from .visualize import activation_grid, save_grid

    model = load_model(args.weights)
    if args.layer not in model.layer_names():
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
    from .summary import format_table, layer_table

    print(format_table(layer_table(tuple(args.size), include_aux=args.aux)))
    return 0


def _cmd_convert(args):
    from .weights import convert_checkpoint

    meta = convert_checkpoint(args.src, args.dst)
    print(f"converted {args.src} -> {args.dst} (sha256 {meta['source_sha256'][:12]}...)")
    return 0


def _cmd_weights_fetch(args):
    from . import config
    from .fetch import fetch_weights

    path = fetch_weights(
        url=args.url or config.PUBLISHED_URL,
        hash_prefix=args.hash_prefix if args.hash_prefix is not None else config.PUBLISHED_SHA256_PREFIX,
        force=args.force,
        progress=not args.quiet,
    )
    print(path)
    return 0


def _cmd_weights_path(args):
    from . import config

    print(config.cache_dir())
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="pyincept", description="Inception v3 in NumPy and Numba.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("classify", help="top-K ImageNet classes for image files and folders")
    c.add_argument("paths", nargs="+", metavar="PATH", help="image file, or folder searched recursively")
    c.add_argument("--weights", metavar="FILE", help="pyincept .npz (default: $PYINCEPT_WEIGHTS, else the fetched weights)")
    c.add_argument("--top", type=_positive, default=5, metavar="K", help="classes per image (default 5)")
    c.add_argument("--json", action="store_true", help="JSON Lines on stdout: one object per input")
    c.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="images per forward pass (default 8)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(run=_cmd_classify)

    a = sub.add_parser("activations", help="a named layer's activations for one image, as a tiled PNG")
    a.add_argument("image", metavar="IMAGE")
    a.add_argument("--layer", required=True, metavar="NAME", help="dotted layer name, e.g. Mixed_5b.branch_pool")
    a.add_argument("--weights", metavar="FILE", help="pyincept .npz (default: $PYINCEPT_WEIGHTS, else the fetched weights)")
    a.add_argument("--out", default="grid.png", metavar="FILE", help="PNG to write (default grid.png)")
    a.add_argument("--cols", type=_positive, default=4, metavar="C", help="tiles per row (default 4)")
    a.add_argument("--pad", type=_non_negative, default=1, metavar="P", help="pixels between tiles (default 1)")
    a.add_argument("--scale", type=_positive, default=1, metavar="S", help="upsample the grid S times (default 1)")
    a.set_defaults(run=_cmd_activations)

    lay = sub.add_parser("layers", help="every named layer: output shape, parameters and multiply-accumulates")
    lay.add_argument("--size", type=_positive, nargs=2, default=(299, 299), metavar=("H", "W"), help="input size (default 299 299)")
    lay.add_argument("--aux", action="store_true", help="include the auxiliary head")
    lay.set_defaults(run=_cmd_layers)

    p = sub.add_parser("convert", help="convert a torchvision Inception v3 checkpoint (.pth) to a pyincept .npz")
    p.add_argument("src", metavar="SRC", help="torchvision checkpoint, e.g. inception_v3_google-0cc3c7bd.pth")
    p.add_argument("dst", metavar="DST.npz", help="pyincept weight file to write")
    p.set_defaults(run=_cmd_convert)

    w = sub.add_parser("weights", help="manage the published weights")
    wsub = w.add_subparsers(dest="weights_command", metavar="ACTION")
    wsub.required = True
    f = wsub.add_parser("fetch", help="download the published checkpoint, check its SHA-256, convert it into the cache")
    f.add_argument("--url", help="download from this URL instead (a mirror)")
    f.add_argument("--hash-prefix", help="expected SHA-256 prefix (hex) of the file at --url")
    f.add_argument("--force", action="store_true", help="download and convert again even if cached")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(run=_cmd_weights_fetch)
    pth = wsub.add_parser("path", help="print the cache folder ($PYINCEPT_CACHE overrides it)")
    pth.set_defaults(run=_cmd_weights_path)
    return parser


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


def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except PyinceptError as e:
        print(f"pyincept: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyincept: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
