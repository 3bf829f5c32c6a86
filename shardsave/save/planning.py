"""Step 2 of a save when the plan must be made (the first save of a Saver, or a layout
that changed): the coordinator plans, every other rank gets its share.

Every rank used to plan alike from an all-gather of every rank's blocks, which needs no
agree round but makes each rank receive and plan the whole job's blocks: 88 ms of a
64-rank first save on every rank here, and ten million blocks on each of ten thousand.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError
from ..plan import BlockMeta, SavePlan, make_save_plan


def coordinated_plan(job, metas: list[BlockMeta]) -> SavePlan:
    """The coordinator plans and keeps the whole plan (the commit needs it); every other
    rank gets its share (SavePlan.share), so a rank's first save does not grow with the
    number of ranks. A plan error is raised on every rank."""
    comm, the_plan, shares, error = job.comm, None, None, None
    gathered = comm.gather(metas)
    if comm.is_coordinator:
        try:
            the_plan = make_save_plan(gathered)
            shares = [None if r == comm.rank else the_plan.share(r) for r in range(comm.size)]
        except InvalidArgumentError as exc:  # ranks disagree on a variable: a user's error
            error = InvalidArgumentError(f"saving {job.prefix}: {exc}")
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree
            error = exc
    comm.agree(error, job.what)
    mine = comm.scatter(shares)
    return the_plan if comm.is_coordinator else mine
