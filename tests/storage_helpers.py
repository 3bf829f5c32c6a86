"""Storage helpers only the tests use (moved out of shardsave.storage, which never globbed)."""

from __future__ import annotations

import fnmatch
import os

from shardsave import storage


def glob(loc: storage.Location, pattern: str) -> list[storage.Location]:
    """Names in the directory ``loc`` matching ``pattern`` (fnmatch), sorted: as
    ``storage.glob`` did, locally every name (directories too), elsewhere the files of one
    fresh listing (a missing S3 bucket raises NotFoundError)."""
    if loc.is_local:
        try:
            found = os.listdir(loc.path)
        except FileNotFoundError:
            found = []
    else:
        found = list(storage.files_in(loc))
    return [loc.child(n) for n in sorted(found) if fnmatch.fnmatchcase(n, pattern)]
