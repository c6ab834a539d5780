"""Pod sandboxes: pinned namespaces, hostname, resolv.conf and hosts, sysctls, the pod cgroup.

A sandbox has no process of its own unless its containers share one PID namespace: its
network, IPC and UTS namespaces are created by the exec'd ``pinns`` helper
(:mod:`moorage.sandbox.pinns`) and kept alive by bind mounts (:mod:`moorage.sandbox.namespaces`).
Where a pod shares its PID namespace, an infra process (``catatonit -P``) is PID 1 of it.
"""
