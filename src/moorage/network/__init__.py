"""Pod networking through CNI plugins (see ``cni.CNIManager``)."""

from moorage.network.cni import CNIManager
from moorage.network.netns import is_netns
from moorage.network.types import (
    AttachRequest,
    AttachResult,
    Bandwidth,
    CNIError,
    NetworkNotReady,
    PortMapping,
)

__all__ = [
    "AttachRequest",
    "AttachResult",
    "Bandwidth",
    "CNIError",
    "CNIManager",
    "NetworkNotReady",
    "PortMapping",
    "is_netns",
]
