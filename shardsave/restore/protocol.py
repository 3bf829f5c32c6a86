"""A collective restore (``Saver.restore``), per rank:

1. the coordinator finishes a save of the prefix interrupted after its commit point and
   reads ``P.index`` once; every rank gets the bytes and parses them (restore/index.py);
   every rank must have asked for the same prefix;
2. every rank picks its targets (restore/targets.py), reads only the byte ranges its own
   blocks need into fresh arrays, and checks every byte it would write into a
   variable's own array (in_place.py, first pass); the ranks agree: nothing has changed yet;
3. every rank writes the checked bytes into the variables' own arrays (second pass) and
   the ranks agree again; then the variables adopt their fresh arrays (or copy them into
   the caller's arrays they share, checked in step 2 to take them).

With ``in_place="direct"`` step 2 reads the bytes for the variables' own arrays straight
into them, checked as they land (direct.py), after everything else it reads has been
read and checked; step 3 has nothing left to read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import DataLossError
from .direct import Direct
from .fresh import load
from .in_place import InPlaceLoad
from .index import read_index
from .reads import LoadStats
from .small import load_small
from .targets import finish, small_in_place, targets

if TYPE_CHECKING:
    from .. import storage
    from .._comm import Comm
    from ..save.layout import SaveLayout

log = logging.getLogger("shardsave")


def restore(
    comm: Comm,
    layout: SaveLayout,
    prefix: str,
    resolve: Callable[[str], storage.Location],
    *,
    in_place: bool | str,
    reshape: bool,
    fsync: bool,
    on_read: Callable[[LoadStats], None],
) -> None:
    """Give ``layout``'s variables their values from the checkpoint at ``prefix``, or
    raise the same error on every rank and change none. ``on_read`` gets this rank's
    read statistics as soon as its own reads and checks succeeded."""
    what = f"restoring {prefix}"
    started = time.monotonic()
    try:
        loc = resolve(prefix)
    except Exception as exc:  # tell the other ranks in their step 1 rather than leave them waiting
        comm.agree(exc, what)
        raise
    index = read_index(loc, comm, what, key={"path": prefix, "location": loc.url}, recover=True, fsync=fsync)
    stats = LoadStats()
    direct = in_place == "direct"
    single_pass: Direct | None = None
    with InPlaceLoad(loc, index) as live:

        def read_and_check():
            found = targets(layout, prefix, index, live=bool(in_place) and loc.is_local, reshape=reshape)
            files = live.files  # each data file's size looked up once
            load(loc, index, found.fresh, stats, files)
            if not direct:
                live.check(found.live, stats)
            straight = small_in_place(found) if direct and loc.is_local else ([], [])
            small_arrays = []
            if found.small_names:  # these arrays already have their variables' shapes
                small_arrays = load_small(loc, index, found.small_names, stats, files)
            updates = [(var, finish(var, arr)) for var, arr in found.updates]
            updates += zip(found.small_vars, small_arrays, strict=True)
            for var, arr in updates:  # a variable sharing the caller's array copies into it
                var._check_set(arr)
            if direct:  # last: any other failure leaves the variables' own arrays untouched
                nonlocal single_pass
                single_pass = Direct(found.live, *straight)
                single_pass.load(loc, index, stats, files)
            on_read(stats)
            return found, updates

        # every byte is checked on every rank; nothing has changed yet (but "direct")
        try:
            found, updates = comm.every_rank(what, read_and_check)
        except Exception as exc:
            if single_pass is None:
                raise
            raise single_pass.explain(exc, comm.rank) from exc
        log.debug("%s: every rank read and checked its bytes", prefix)

        def fill() -> None:
            if direct:
                return
            try:
                live.fill(stats)
            except Exception as exc:  # noqa: BLE001
                names = ", ".join(repr(t.name) for t in found.live)
                raise DataLossError(
                    f"{what}: reading the checked bytes again failed ({exc}); the variables "
                    f"being written in place ({names}) hold partial values: restore them again"
                ) from None

        comm.every_rank(what, fill)  # collective even where there is nothing to fill
    for var, arr in updates:  # adopted, or copied into the arrays the variables share
        var._set(arr)
    if comm.is_coordinator:
        log.info(
            "restored %s: %d variables, this rank read %d bytes, in %.2f s on %d ranks",
            prefix,
            len(layout.names),
            stats.bytes_read,
            time.monotonic() - started,
            comm.size,
        )
