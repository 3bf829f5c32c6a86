"""Running the ``shardsave`` command in the test's own process (the same ``main``, without
a subprocess's start-up cost)."""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections.abc import Callable

import numpy as np

from shardsave import cli


def shardsave_main(*args: str) -> tuple[int, str, str]:
    """``shardsave ARGS`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def completed(main: Callable[[list[str]], int], *args: str) -> subprocess.CompletedProcess:
    """``main(args)`` in this process, as ``subprocess.run`` would report it (numpy's print
    options, which ``--printoptions`` changes, are put back)."""
    out, err = io.StringIO(), io.StringIO()
    restored = np.printoptions(**np.get_printoptions())
    with restored, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
