"""The `pyincept` command line.

    pyincept convert SRC.pth DST.npz     torchvision checkpoint -> pyincept weight file
    pyincept weights fetch               download, verify, convert and cache the published weights
    pyincept weights path                print where fetched weights live

Expected failures (bad files, no network, wrong shapes) print one line,
`pyincept: error: ...`, and exit 1; usage errors exit 2 (argparse). No traceback
is shown for either.
"""

import argparse
import sys

from .errors import PyinceptError


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
