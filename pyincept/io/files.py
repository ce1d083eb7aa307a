"""Writing a file so that readers see all of it or none: weight files, statistics, export shards, caches."""

import os
import tempfile
from pathlib import Path

PART = ".part"      # the suffix of a write in progress (an interrupted one leaves such a file behind)


def write_atomically(path, write):
    """write(binary file) into a temporary file in the same folder, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=PART, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
