"""Tests for `pyincept.fetch`: download, hash check, conversion and caching, end to end.

A real HTTP server on 127.0.0.1 (port 0, a daemon thread) serves a real torchvision
Inception v3 checkpoint, so urllib, the progress bar, the hash check and the
converter all run for real. Nothing here contacts any address but loopback.

The failures a user meets are each tested for one thing: a one-line DownloadError
that says what failed and, when the network is the problem, where to put the file
by hand; and an empty cache folder afterwards (no .pth, .part or .npz left).
"""

import functools
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pyincept.io import fetch
from pyincept.errors import DownloadError
from pyincept.io.fetch import default_weights_path, fetch_weights
from pyincept.io.convert import convert_checkpoint
from pyincept.io.npz import load_weights
from pyincept.models import get_spec, models

NAME = "inception_v3_test.pth"  # any name; the hash prefix is passed explicitly


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder holding a torchvision checkpoint (~100 MB, built once), its SHA-256, and one torch tensor."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    folder = tmp_path_factory.mktemp("served")
    torch.save(model.state_dict(), folder / NAME)
    sha256 = hashlib.sha256((folder / NAME).read_bytes()).hexdigest()
    conv1 = model.state_dict()["Conv2d_1a_3x3.conv.weight"].numpy().copy()
    return {"folder": folder, "sha256": sha256, "prefix": sha256[:8], "conv1": conv1}


@pytest.fixture(scope="module")
def expected(served, tmp_path_factory):
    """The oracle: `convert_checkpoint` run directly on the served file."""
    dst = tmp_path_factory.mktemp("direct") / "direct.npz"
    convert_checkpoint(served["folder"] / NAME, dst)
    return load_weights(dst)


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, counts GETs; `/truncated/...` promises 1000 bytes and sends 10; `/slow/...` stalls."""

    def do_GET(self):
        self.server.gets += 1
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            return
        if self.path.startswith("/slow/"):
            time.sleep(2)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # The Ctrl-C and timeout tests hang up mid-response on purpose; that is no error here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server(served):
    """A loopback HTTP server over the served folder: `.url(name)` and `.gets` (requests so far)."""
    handler = functools.partial(_CountingHandler, directory=str(served["folder"]))
    httpd = _QuietServer(("127.0.0.1", 0), handler)
    httpd.gets = 0
    httpd.url = lambda name=NAME: f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def closed_port():
    """A loopback port nobody listens on: bind, read the port, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_equal_weights(got, want):
    (got_params, got_meta), (want_params, want_meta) = got, want
    assert got_params.keys() == want_params.keys()
    for key in want_params:
        np.testing.assert_array_equal(got_params[key], want_params[key], err_msg=key)
    assert got_meta["source_sha256"] == want_meta["source_sha256"]


# --- the happy path ----------------------------------------------------------------


def test_fetch_downloads_verifies_and_converts(server, served, expected, tmp_path):
    path = fetch_weights("inception_v3", server.url(), served["prefix"], cache=tmp_path, progress=False)
    assert path == tmp_path / "inception_v3_test.npz"
    assert server.gets == 1
    assert (tmp_path / NAME).read_bytes() == (served["folder"] / NAME).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([NAME, path.name])  # no .part left
    got = load_weights(path)
    _assert_equal_weights(got, expected)
    # torch OIHW (K, C, R, S) -> pyincept HWIO (R, S, C, K)
    np.testing.assert_array_equal(got[0]["Conv2d_1a_3x3.conv.weight"], served["conv1"].transpose(2, 3, 1, 0))
    assert got[1]["source_sha256"] == served["sha256"]


def test_second_fetch_makes_no_request(server, served, tmp_path):
    first = fetch_weights("inception_v3", server.url(), served["prefix"], cache=tmp_path, progress=False)
    second = fetch_weights("inception_v3", server.url(), served["prefix"], cache=tmp_path, progress=False)
    assert second == first
    assert server.gets == 1


def test_force_downloads_again(server, served, expected, tmp_path):
    fetch_weights("inception_v3", server.url(), served["prefix"], cache=tmp_path, progress=False)
    path = fetch_weights("inception_v3", server.url(), served["prefix"], cache=tmp_path, progress=False, force=True)
    assert server.gets == 2
    _assert_equal_weights(load_weights(path), expected)


def test_hash_prefix_is_case_insensitive(server, served, tmp_path):
    path = fetch_weights("inception_v3", server.url(), served["prefix"].upper(), cache=tmp_path, progress=False)
    assert path.is_file()


def test_checkpoint_placed_by_hand_needs_no_network(server, served, expected, tmp_path):
    shutil.copy(served["folder"] / NAME, tmp_path / NAME)
    path = fetch_weights("inception_v3", server.url(), served["prefix"], cache=tmp_path, progress=False)
    assert server.gets == 0
    _assert_equal_weights(load_weights(path), expected)


def test_pyincept_cache_env_is_honoured(server, served, tmp_path, monkeypatch):
    cache = tmp_path / "from-env"
    monkeypatch.setenv("PYINCEPT_CACHE", str(cache))
    path = fetch_weights("inception_v3", server.url(), served["prefix"], progress=False)
    assert path == cache / "inception_v3_test.npz" and path.is_file()


def test_progress_bar_goes_to_stderr(server, served, tmp_path, capfd):
    fetch_weights("inception_v3", server.url(), served["prefix"], cache=tmp_path, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert NAME in err and "100%" in err


def test_default_weights_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PYINCEPT_CACHE", str(tmp_path))
    assert default_weights_path() is None
    (tmp_path / "inception_v3_google-0cc3c7bd.npz").write_bytes(b"")
    assert default_weights_path() == tmp_path / "inception_v3_google-0cc3c7bd.npz"
    assert default_weights_path("googlenet") is None
    (tmp_path / "googlenet-1378be20.npz").write_bytes(b"")
    assert default_weights_path("googlenet") == tmp_path / "googlenet-1378be20.npz"


def test_published_names_agree():
    """Each weight set's URL basename is its file name and carries its hash prefix, as torchvision names them."""
    for name in models():
        for ws in get_spec(name).weights:
            assert ws.url.rsplit("/", 1)[1] == ws.filename
            assert Path(ws.filename).stem.endswith("-" + ws.sha256_prefix)
            assert Path(ws.filename).stem + ".npz" == ws.converted_filename


# --- failures: one line, and nothing left behind ----------------------------------------


def _one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_wrong_hash_prefix_deletes_the_download(server, served, tmp_path):
    wrong = format((int(served["prefix"][0], 16) + 1) % 16, "x") + served["prefix"][1:]
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("inception_v3", server.url(), wrong, cache=tmp_path, progress=False)
    message = _one_line_error(excinfo)
    assert wrong in message and served["sha256"] in message and NAME in message
    assert list(tmp_path.iterdir()) == []


def test_bad_file_placed_by_hand_is_deleted(served, tmp_path, closed_port):
    (tmp_path / NAME).write_bytes(b"not the checkpoint")
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("inception_v3", f"http://127.0.0.1:{closed_port}/{NAME}", served["prefix"], cache=tmp_path, progress=False)
    message = _one_line_error(excinfo)
    assert hashlib.sha256(b"not the checkpoint").hexdigest() in message and served["prefix"] in message
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_says_where_to_put_the_file(served, tmp_path, closed_port):
    url = f"http://127.0.0.1:{closed_port}/{NAME}"
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("inception_v3", url, served["prefix"], cache=tmp_path, progress=False)
    message = _one_line_error(excinfo)
    assert url in message and "refused" in message.lower()
    assert str(tmp_path / NAME) in message
    assert list(tmp_path.iterdir()) == []


def test_http_404(server, served, tmp_path):
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("inception_v3", server.url("missing.pth"), served["prefix"], cache=tmp_path, progress=False)
    message = _one_line_error(excinfo)
    assert "404" in message and str(tmp_path / "missing.pth") in message
    assert list(tmp_path.iterdir()) == []


def test_server_hanging_up_early(server, served, tmp_path):
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("inception_v3", server.url(f"truncated/{NAME}"), "", cache=tmp_path, progress=False)
    assert "10 of 1000 bytes" in _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_timeout(server, served, tmp_path):
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("inception_v3", server.url(f"slow/{NAME}"), served["prefix"], cache=tmp_path, progress=False, timeout=0.3)
    assert "timed out" in _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_leaves_no_part_file(server, served, tmp_path, monkeypatch):
    class InterruptedBar(fetch.tqdm):
        def update(self, n=1):
            raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "tqdm", InterruptedBar)
    with pytest.raises(KeyboardInterrupt):
        fetch_weights("inception_v3", server.url(), served["prefix"], cache=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_folder(served, tmp_path, closed_port):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_bytes(b"")
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("inception_v3", f"http://127.0.0.1:{closed_port}/{NAME}", served["prefix"], cache=not_a_folder)
    assert str(not_a_folder) in _one_line_error(excinfo)


def test_bad_arguments():
    with pytest.raises(DownloadError, match="not hexadecimal"):
        fetch_weights("inception_v3", "http://127.0.0.1:9/x.pth", "0cc3-bd")
    with pytest.raises(DownloadError, match="does not name a checkpoint"):
        fetch_weights("inception_v3", "http://127.0.0.1:9/", "0cc3c7bd")


# --- the command line, in a subprocess ------------------------------------------------


def _cli(args, cache):
    env = {**os.environ, "PYINCEPT_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "pyincept", "weights", "fetch", *args, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_fetch(server, served, tmp_path):
    done = _cli(["--url", server.url(), "--hash-prefix", served["prefix"]], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "inception_v3_test.npz")
    assert (tmp_path / "inception_v3_test.npz").is_file()


def test_cli_fetch_offline(served, tmp_path, closed_port):
    done = _cli(["--url", f"http://127.0.0.1:{closed_port}/{NAME}", "--hash-prefix", served["prefix"]], tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyincept: error:"), done.stderr
    assert "Traceback" not in done.stderr
    assert str(tmp_path / NAME) in lines[0]
