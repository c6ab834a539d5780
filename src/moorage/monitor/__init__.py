"""The per-container monitor (conmon's job) and the daemon's client of it.

- :mod:`.crilog`: the CRI log line format (pure).
- :mod:`.protocol`: file names, the create request, the exit file, ctl requests (pure).
- :mod:`.monitor`: one container's monitor (runs in a process forked per container).
- :mod:`.server`: the monitor server, exec'd once, that forks the monitors.
- :mod:`.client`: the daemon's side (asyncio).

The monitor program (``python -P -S -m moorage.monitor``) imports only the standard library
and the modules above but the client; see ``docs/monitor.md``.
"""
