"""The one exception type whose message the CLI prints as a single line and exits non-zero on, and
:func:`native_stderr`, which keeps native libraries' own lines from adding to it."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator


class UserError(Exception):
    """Bad input or a missing dependency: the message says what and, where possible, how to fix it."""


class MissingDependencyError(UserError):
    """An optional backend is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str, purpose: str = ""):
        what = f" ({purpose})" if purpose else ""
        super().__init__(f"{module} is not installed{what}: pip install 'gmcnn-mobile[{extra}]'")
        self.module = module
        self.extra = extra


def _drop_all(line: str) -> bool:
    return False


@contextlib.contextmanager
def native_stderr(keep: Callable[[str], bool] = _drop_all) -> Iterator[None]:
    """Run the block with file descriptor 2 redirected to a temporary file, then write back to
    stderr only the lines ``keep`` accepts (default: none).

    Native libraries write to descriptor 2 themselves, past Python's ``sys.stderr``: a codec that
    fails ("libpng error: ..."), LiteRT announcing its delegate ("INFO: Created TensorFlow Lite
    XNNPACK delegate for CPU."). A refused input must print only the CLI's one line. The
    redirection is process-wide, so use it around single-threaded native calls only.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 (embedded use): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines(keepends=True) if keep(line)]
            if kept:
                os.write(2, "".join(kept).encode())
