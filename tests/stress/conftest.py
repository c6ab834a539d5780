"""Fixtures of the fault tests: the e2e node (namespace, CNI bridge, registry, busybox)."""

from tests.e2e.conftest import cni_dir, node_ns  # noqa: F401 (fixtures)
from tests.e2e.test_containers import busybox_ref, env  # noqa: F401 (fixtures)
