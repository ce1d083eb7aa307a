"""The README's Python example runs as written (from the repository root)."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parent.parent


def test_readme_python_example_runs(monkeypatch, tmp_path):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 1000)
    assert (tmp_path / "grid.png").exists()
    assert namespace["y"].shape == (1, 299, 299, 8)
    assert namespace["dx"].shape == (1, 299, 299, 3) and np.abs(namespace["dx"]).max() > 0
    assert namespace["grads"]["Conv2d_1a_3x3.conv.weight"].shape == (3, 3, 3, 32)
