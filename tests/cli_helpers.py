"""Running the ``shardsave`` command in the test's own process (the same ``main``, without
a subprocess's start-up cost)."""

from __future__ import annotations

import contextlib
import io

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
