"""Fetch a model's published checkpoint, check its hash, convert it into the cache.

What it is: `fetch_weights(model)` downloads the checkpoint its registry entry names
(`WeightSet.url`: torchvision's port of Google's Inception v3, torchvision's GoogLeNet) with
the standard library, checks its SHA-256, and converts it once into pyincept's weight file
with `convert.convert_checkpoint`. Later calls return the cached `.npz` without touching
the network.

What it is not: a download manager. No retries, no resumed downloads, no mirror
list, no proxy settings beyond what `urllib` reads from the environment. On a
machine with no network, put the checkpoint in the cache folder by hand and call
it again: it is then checked and converted with no download.

The cache folder (`config.cache_dir()`; `$PYINCEPT_CACHE` overrides) holds

    inception_v3_google-0cc3c7bd.pth    a checkpoint, byte for byte as published
    inception_v3_google-0cc3c7bd.npz    pyincept's weight file converted from it
    googlenet-1378be20.pth, .npz        the same for GoogLeNet

A file gets its final name only once it is whole and verified: a download lands in
a `.part` file first, which is deleted on any failure, Ctrl-C included. A
checkpoint that passed the hash check is kept even if converting it fails, so a
fixed pyincept can convert it again without a second download.
"""

import hashlib
import http.client
import os
import posixpath
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .. import config
from ..errors import DownloadError, WeightsError
from ..models.registry import get_spec
from .convert import convert_checkpoint
from .npz import sha256_file

# 1 MiB reads: few system calls, and a progress bar that still moves smoothly.
CHUNK_BYTES = 1 << 20


def default_weights_path(model="inception_v3"):
    """The model's converted published weights if `fetch_weights(model)` has run here, else None."""
    path = Path(config.cache_dir()) / get_spec(model).default_weights.converted_filename
    return path if path.is_file() else None


def weights_path(weights=None, model=None):
    """(model name, weight file) for an explicit `weights`, else $PYINCEPT_WEIGHTS, else the
    fetched weights of `model` (default inception_v3); "random" passes through (the seeded
    init). A one-line WeightsError says how to get weights when there are none."""
    name = get_spec(model or "inception_v3").name
    path = weights or os.environ.get("PYINCEPT_WEIGHTS") or default_weights_path(name)
    if path is None:
        published = get_spec(name).default_weights.filename
        flag = f" --model {name}" if name != "inception_v3" else ""
        raise WeightsError(
            f"no weights: run `pyincept weights fetch{flag}` (needs the internet), or pass --weights FILE.npz "
            f"or set PYINCEPT_WEIGHTS (make the file with `pyincept convert {published} FILE.npz`)"
        )
    return name, str(path)


def fetch_weights(model="inception_v3", url=None, hash_prefix=None, cache=None, force=False, progress=True, timeout=30):
    """Download, verify and convert a checkpoint once; return the path of its cached `.npz`.

    model        a registered name: its default weight set says where and what to fetch
    url          download from here instead (a mirror); its basename is the local file name
    hash_prefix  hex digits the file's SHA-256 must start with (default: the weight set's;
                 "" accepts any file)
    cache        folder for both files (default: `config.cache_dir()`)
    force        download and convert again even if both files are cached
    progress     a progress bar on stderr while downloading
    timeout      seconds to wait for the server to connect or send the next bytes

    Raises DownloadError (no network, HTTP error, hash mismatch, unwritable cache);
    conversion raises CheckpointError or WeightsError.
    """
    published = get_spec(model).default_weights
    url = url or published.url
    hash_prefix = published.sha256_prefix if hash_prefix is None else hash_prefix
    # torchvision names each file after the first 8 hex digits of its SHA-256, and
    # torch.hub's check_hash compares only that prefix. The full hash was never
    # published, so the prefix is all anyone can check.
    prefix = hash_prefix.lower()
    if not re.fullmatch(r"[0-9a-f]*", prefix):
        raise DownloadError(f"hash prefix {hash_prefix!r} is not hexadecimal")
    name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if name in ("", ".", "..") or name.endswith(".npz"):
        raise DownloadError(f"{url} does not name a checkpoint file (expected e.g. .../{published.filename})")

    folder = Path(cache if cache is not None else config.cache_dir()).expanduser()
    checkpoint = folder / name
    converted = folder / (Path(name).stem + ".npz")
    if converted.is_file() and not force:
        return converted
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the cache folder {folder} ({_reason(e)}); "
                            "set PYINCEPT_CACHE to a writable folder") from None

    if checkpoint.is_file() and not force:
        # Placed by hand (an offline machine) or left by a fetch whose conversion failed.
        try:
            actual = sha256_file(checkpoint)
        except OSError as e:
            raise DownloadError(f"cannot read {checkpoint} ({_reason(e)})") from None
        if not actual.startswith(prefix):
            checkpoint.unlink(missing_ok=True)
            raise DownloadError(f"{checkpoint}: SHA-256 is {actual}, expected it to start with {prefix}; "
                                "deleted it, the next fetch downloads it again")
    else:
        _download(url, checkpoint, prefix, progress, timeout, model)
    convert_checkpoint(checkpoint, converted, model=model)
    return converted


def _download(url, checkpoint, prefix, progress, timeout, model):
    """Stream `url` into a `.part` file beside `checkpoint`, check the hash, then rename it into place."""
    try:
        fd, part = tempfile.mkstemp(prefix=checkpoint.name + ".", suffix=".part", dir=checkpoint.parent)
    except OSError as e:
        raise DownloadError(f"cannot write to the cache folder {checkpoint.parent} ({_reason(e)}); "
                            "set PYINCEPT_CACHE to a writable folder") from None
    part = Path(part)
    try:
        with os.fdopen(fd, "wb") as f:
            actual = _stream(url, f, checkpoint, prefix, progress, timeout, model)
        if not actual.startswith(prefix):
            raise DownloadError(f"{url}: downloaded file {checkpoint.name} has SHA-256 {actual}, expected it to "
                                f"start with {prefix}; deleted it (a corrupted download, or the wrong hash prefix)")
        # Same folder, so the rename is atomic: other readers see no file or the whole file.
        os.replace(part, checkpoint)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _stream(url, f, checkpoint, prefix, progress, timeout, model):
    """Copy the response body into `f` chunk by chunk; return its SHA-256 hex digest."""
    request = urllib.request.Request(url, headers={"User-Agent": "pyincept"})
    digest, received, total = hashlib.sha256(), 0, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=checkpoint.name,
                      file=sys.stderr, disable=not progress) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    try:
                        f.write(chunk)
                    except OSError as e:  # a full disk, not the network: say so
                        raise DownloadError(f"cannot write {checkpoint.parent} ({_reason(e)})") from None
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise _unreachable(url, _reason(e), checkpoint, prefix, model) from None
    # http.client returns a short body without complaint when the server hangs up early.
    if total is not None and received != total:
        raise _unreachable(url, f"connection closed after {received} of {total} bytes", checkpoint, prefix, model)
    return digest.hexdigest()


def _unreachable(url, reason, checkpoint, prefix, model):
    """The one-line error for a failed download: what failed, and where to put the file by hand."""
    published = get_spec(model).default_weights
    command = "pyincept weights fetch" + (f" --model {model}" if model != "inception_v3" else "")
    if url != published.url:
        command += f" --url {url}"
    if prefix != published.sha256_prefix:
        command += f" --hash-prefix {prefix}"
    return DownloadError(f"could not download {url} ({reason}); if this machine is offline, download the file "
                         f"elsewhere and put it at {checkpoint}, then run `{command}` again")


def _reason(error):
    """A short reason: 'HTTP 404 Not Found', 'Connection refused', 'timed out', ..."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        error = error.reason  # the socket error underneath: refused, DNS, timeout, TLS
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["default_weights_path", "fetch_weights"]
