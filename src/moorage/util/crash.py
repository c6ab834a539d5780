"""Crash points: a daemon that kills itself with SIGKILL at a named step, for tests.

``MOORAGE_CRASHPOINT=<name>`` in the daemon's environment makes the first
``crashpoint(<name>)`` call SIGKILL the whole process, exactly as an operator's ``kill -9``
or the OOM killer would at that point. The crash tests (tests/stress/test_crashpoints.py)
start a daemon with one step named, make the call that reaches it, restart without it,
and check that the state is consistent and the same call succeeds.

``MOORAGE_CRASHPOINT=file:<path>`` reads the name from that file at each crash point
instead (an empty or missing file arms none). Without the variable the hook is one
comparison with ``None``. Names are
``<object>.<operation>.<what is done>``; :data:`NAMES` lists them so a test can check that
each is reached.
"""

from __future__ import annotations

import os
import signal

ENV = "MOORAGE_CRASHPOINT"

#: Every crash point the code has, in the order the steps happen.
NAMES = (
    # RunPodSandbox (sandbox/manager.py)
    "sandbox.run.recorded",
    "sandbox.run.cgroup_made",
    "sandbox.run.namespaces_pinned",
    "sandbox.run.network_adding",  # network/cni.py: the cache says "adding"
    "sandbox.run.network_attached",
    "sandbox.run.files_written",
    "sandbox.run.infra_started",
    "sandbox.run.ready",
    # StopPodSandbox and RemovePodSandbox (sandbox/manager.py)
    "sandbox.stop.containers_stopped",
    "sandbox.stop.network_detached",
    "sandbox.stop.unpinned",
    "sandbox.remove.cgroups_removed",
    "sandbox.remove.files_removed",
    # CreateContainer (container/manager.py)
    "container.create.recorded",
    "container.create.prepared",
    "container.create.runtime_created",
    "container.create.saved",
    # StartContainer
    "container.start.runtime_started",
    "container.start.saved",
    # StopContainer (and an exit)
    "container.stop.signalled",
    "container.exit.recorded",
    "container.release.runtime_deleted",
    # RemoveContainer
    "container.remove.layer_discarded",
    "container.remove.state_discarded",
    # PullImage (image/pull.py, image/store.py)
    "image.pull.layer_unpacked",
    "image.pull.layer_added",
    "image.pull.blobs_written",
    # RemoveImage (image/store.py)
    "image.remove.record_removed",
    "image.remove.layer_removed",
)

#: ``file:<path>``: the crash point is the name in that file, read at every crash point, so
#: a test can arm one step after another without restarting the daemon in between.
FILE_PREFIX = "file:"

_armed: str | None = os.environ.get(ENV) or None


def crashpoint(name: str) -> None:
    """SIGKILL this process if ``name`` is the crash point the environment names."""
    if _armed is None:
        return
    wanted = _armed
    if wanted.startswith(FILE_PREFIX):
        try:
            with open(wanted[len(FILE_PREFIX):]) as f:
                wanted = f.read().strip()
        except OSError:
            return
    if name == wanted:
        os.kill(os.getpid(), signal.SIGKILL)
