"""`pyincept convert` as a user runs it: the real entry point, in a subprocess.

Good checkpoints convert; every bad one gets one line on stderr, exit 1, no traceback.
"""

import pickle
import zipfile

import numpy as np
import pytest
import torch

from conftest import run_cli
from pyincept.io.npz import load_weights


def assert_one_line_failure(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyincept: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_convert_writes_hwio_weights_with_provenance(checkpoints, converted, tv_inception, fmt):
    params, meta = load_weights(converted[fmt])
    w = tv_inception.state_dict()["Mixed_6b.branch7x7_2.conv.weight"].numpy()    # (K, C, 1, 7)
    np.testing.assert_array_equal(params["Mixed_6b.branch7x7_2.conv.weight"], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc.weight"], tv_inception.state_dict()["fc.weight"].numpy().T)
    assert not any(k.endswith("num_batches_tracked") for k in params)
    assert meta["source"] == checkpoints[fmt].name and len(meta["source_sha256"]) == 64


def save_state(path, state):
    torch.save(state, path)
    return path


def test_wrong_shape_names_key_and_both_shapes(tv_inception, tmp_path):
    state = dict(tv_inception.state_dict())
    state["Mixed_5b.branch5x5_2.conv.weight"] = torch.zeros(64, 48, 3, 3)
    src = save_state(tmp_path / "wrong_shape.pth", state)
    result = run_cli("convert", src, tmp_path / "out.npz")
    assert_one_line_failure(result, "Mixed_5b.branch5x5_2.conv.weight", "(3, 3, 48, 64)", "(5, 5, 48, 64)")
    assert not (tmp_path / "out.npz").exists()


def test_missing_and_unexpected_keys(tv_inception, tmp_path):
    state = dict(tv_inception.state_dict())
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(3)
    result = run_cli("convert", save_state(tmp_path / "keys.pth", state), tmp_path / "out.npz")
    assert_one_line_failure(result, "1 missing key(s) ('fc.bias')", "1 unexpected key(s) ('extra.weight')")


def test_another_network_is_not_inception(tmp_path):
    import torchvision

    src = save_state(tmp_path / "resnet.pth", torchvision.models.resnet18(weights=None).state_dict())
    assert_one_line_failure(run_cli("convert", src, tmp_path / "out.npz"),
                            "not a checkpoint of any model pyincept knows; nearest is", "missing key(s)")
    assert_one_line_failure(run_cli("convert", src, tmp_path / "out.npz", "--model", "googlenet"),
                            "not a GoogLeNet state dict")


class SystemCall:
    """Pickles as a call to os.system: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickle_calling_os_system_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    with zipfile.ZipFile(src, "w") as z:                   # torch's zip layout, malicious data.pkl
        z.writestr("evil/data.pkl", pickle.dumps({"fc.weight": SystemCall(marker)}, protocol=2))
        z.writestr("evil/version", "3\n")
    result = run_cli("convert", src, tmp_path / "out.npz")
    assert_one_line_failure(result, "system")
    assert not marker.exists()


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.999])
def test_truncated_checkpoint(checkpoints, tmp_path, fraction):
    data = checkpoints["zip"].read_bytes()
    src = tmp_path / "truncated.pth"
    src.write_bytes(data[: int(len(data) * fraction)])
    assert_one_line_failure(run_cli("convert", src, tmp_path / "out.npz"), "truncated.pth")


def test_not_a_checkpoint_and_missing_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a checkpoint\n")
    assert_one_line_failure(run_cli("convert", text, tmp_path / "out.npz"), "notes.txt")
    assert_one_line_failure(run_cli("convert", tmp_path / "absent.pth", tmp_path / "out.npz"), "absent.pth")


def test_usage_error_exits_2():
    result = run_cli("convert", "only-one-argument")
    assert result.returncode == 2 and "Traceback" not in result.stderr
