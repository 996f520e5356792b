"""Ray for one piece of work, shared by Tune sweeps and distributed preparation hooks.

Imported only where Ray is used (``import ray`` happens inside :func:`ray_session`), so a plain training run
never pays for it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from recbole_llmfuse import compat


@contextlib.contextmanager
def ray_session(address: Optional[str], num_cpus: Optional[int], **kwargs):
    """Ray for one piece of work: joins the cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:10001``),
    or starts a private local Ray with ``num_cpus`` when ``address`` is empty; uses the Ray already initialised in
    this process, if any. What it started it shuts down at the end, so the next sweep or prep run gets a Ray with
    its own settings instead of inheriting these. ``"local"``, not ``None``: without an address Ray joins whatever
    ``ray start`` last recorded on this machine (``/tmp/ray/ray_current_cluster``, left behind even when that head
    is gone) and then refuses ``num_cpus``."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, **kwargs)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()



def worker_setup() -> None:
    """Runs first in every Ray worker: our compat shims must precede Ray's own ``ray.tune`` import there
    (ray 2.6.3's tensorboardX logger reads ``np.bool8``, gone in numpy 2)."""
    compat.apply()
