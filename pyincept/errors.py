"""The exceptions pyincept raises for expected failures.

Every error a user can cause (a bad file, a wrong shape, no network) is a
`PyinceptError` whose message is one line that names the thing at fault. The
command line prints that line and exits non-zero; it never shows a traceback for
these. Anything else escaping is a bug in pyincept.
"""

import threading


class PyinceptError(Exception):
    """Base class: an expected failure with a one-line, user-facing message."""


class CheckpointError(PyinceptError):
    """A checkpoint could not be read safely: corrupt, truncated, not a checkpoint, or a refused pickle global."""


class WeightsError(PyinceptError):
    """Weights are missing, have missing/unexpected keys, or wrong shapes."""


class DownloadError(PyinceptError):
    """A published file could not be fetched, or its SHA-256 did not match."""


# --- Ctrl-C ---------------------------------------------------------------------------

INTERRUPTED = threading.Event()       # set by the command line's SIGINT handler


def stop_if_interrupted():
    """Raise KeyboardInterrupt if Ctrl-C was pressed. Called between batches and shards: a
    KeyboardInterrupt that Python raised inside a finalizer or `__del__` (where it is printed
    and dropped) still stops the run there, at the next batch."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
