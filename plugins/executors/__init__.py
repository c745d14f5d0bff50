"""Built-in executors: `local` (a pool of worker threads on this machine, the default) and `ray` (each task a
Ray task on a cluster whose nodes share the run directory; the optional extra `tbpw[ray]`).

Both run the same jobs the same way (`job.execute(log, slot)`); they differ in where. The `ray` module
imports ray only when a run uses it, so tbpw works without the extra.
"""

from __future__ import annotations

from tbpw import hookimpl


@hookimpl
def tbpw_register_executors(register) -> None:
    from .local import Local
    from .ray_cluster import RayCluster

    register(Local)
    register(RayCluster)
