"""OCI runtime handlers: the adapter around runc, crun or any OCI runtime binary."""

from moorage.oci.runtime import (
    MAX_EXEC_OUTPUT,
    ExecResult,
    OciRuntime,
    OciRuntimeError,
    parse_runc_error,
)

__all__ = ["MAX_EXEC_OUTPUT", "ExecResult", "OciRuntime", "OciRuntimeError", "parse_runc_error"]
