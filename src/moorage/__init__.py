"""moorage: a Kubernetes container runtime (CRI) in Python."""

__version__ = "0.1.0"
CRI_API_VERSION = "v1"
