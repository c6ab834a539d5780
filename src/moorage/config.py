"""The daemon's configuration: one typed, validated object.

Sources, later ones winning: built-in defaults, the main TOML file
(``/etc/moorage/moorage.toml``), the drop-ins of the config dir
(``/etc/moorage/moorage.d/*.toml``, in lexical order, merged table by table), then
command-line flags. An unknown key or a bad value stops the start with an error that
names the key, as CRI-O does with ``crio.conf``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG = Path("/etc/moorage/moorage.toml")
DEFAULT_CONFIG_DIR = Path("/etc/moorage/moorage.d")
MIB = 1024 * 1024


def _absolute(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError("must be an absolute path")
    return value


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


class ConfigError(Exception):
    """A config file or flag that cannot be used; the message names the key and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ApiConfig(_Section):
    listen: Path = Field(
        Path("/run/moorage/moorage.sock"),
        description="Unix socket the CRI gRPC server listens on (flag --listen).",
    )
    socket_mode: int = Field(
        0o660, ge=0, le=0o777, description="Permission bits of the socket file (0o660)."
    )
    grpc_max_recv_msg_size: int = Field(
        80 * MIB,
        ge=16 * MIB,
        description="Largest gRPC message accepted, in bytes (kubelet sends up to 16 MiB).",
    )
    grpc_max_send_msg_size: int = Field(
        80 * MIB, ge=16 * MIB, description="Largest gRPC message sent, in bytes."
    )
    stream_address: str = Field(
        "127.0.0.1",
        description="Address of the streaming server, whose URLs Exec, Attach and PortForward "
        "return (flag --stream-address).",
    )
    stream_port: int = Field(
        0, ge=0, le=65535,
        description="TCP port of the streaming server; 0 picks a free one (flag --stream-port).",
    )
    stream_tls_cert: Path | None = Field(
        None,
        description="PEM certificate: with stream_tls_key, the streaming server speaks TLS "
        "(https URLs).",
    )
    stream_tls_key: Path | None = Field(None, description="PEM private key of stream_tls_cert.")

    @model_validator(mode="after")
    def _stream_tls_pair(self) -> ApiConfig:
        if (self.stream_tls_cert is None) != (self.stream_tls_key is None):
            raise ValueError("api.stream_tls_cert and api.stream_tls_key go together")
        return self


class RuntimeHandler(_Section):
    runtime_path: str = Field(
        "", description="The OCI runtime binary; empty means the handler's name looked up in PATH."
    )
    runtime_root: Path | None = Field(
        None, description="The runtime's --root state dir; empty means <runroot>/runtimes/<name>."
    )
    runtime_type: Literal["oci"] = Field("oci", description="Only OCI runtimes for now.")
    command_timeout: float = Field(
        60.0, gt=0,
        description="Seconds a runtime command (start, kill, delete, state, update, ...) may "
        "take; then it is killed with what it started and the call fails with "
        "DEADLINE_EXCEEDED. `create` has its own bound, create_timeout.",
    )
    create_timeout: float = Field(
        240.0, gt=0,
        description="Seconds `create` may take (run by the container's monitor); then it is "
        "killed and CreateContainer fails. 240 s, as CRI-O allows.",
    )


class RuntimeConfig(_Section):
    cgroup_manager: Literal["cgroupfs", "systemd"] = Field(
        "cgroupfs",
        description="cgroup driver reported to kubelet by RuntimeConfig; must match kubelet's "
        "cgroupDriver (flag --cgroup-manager).",
    )
    default_runtime: str = Field(
        "runc",
        description="Runtime handler for pods that name none (flag --default-runtime).",
    )
    restrict_oom_score_adj: bool = Field(
        False,
        description="Clamp containers' oom_score_adj to the daemon's own when it asks for "
        "less (containerd's option; for hosts that refuse negative values).",
    )
    log_max_line_size: int = Field(
        16 * 1024, ge=1024,
        description="Container log lines longer than this are split into partial (P) lines.",
    )
    infra_command: list[str] = Field(
        ["/usr/bin/catatonit", "-P"],
        description="The infra process of pods whose containers share a PID namespace "
        "(pause mode; needs no image).",
    )
    seccomp_use_default_when_empty: bool = Field(
        False,
        description="Run containers whose request names no seccomp profile with the "
        "RuntimeDefault profile instead of unconfined. CRI-O's option of that name (it "
        "defaulted to true until CRI-O 1.30 removed it in favour of kubelet's "
        "SeccompDefault); off by default, as current CRI-O and containerd behave and the CRI "
        "says.",
    )
    seccomp_profile: str = Field(
        "",
        description="Absolute path of the seccomp profile (docker/containers-common or OCI "
        "format) that RuntimeDefault means; empty means moorage's built-in profile. Re-read "
        "on SIGHUP.",
    )
    apparmor_profile: str = Field(
        "moorage-default",
        description="AppArmor profile of RuntimeDefault (and of containers that name none) "
        "where AppArmor is enabled: moorage-default is loaded from moorage's template when "
        "missing; another name must be loaded; unconfined turns it off.",
    )

    @field_validator("seccomp_profile")
    @classmethod
    def _profile_path(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("must be an absolute path (or empty for the built-in profile)")
        return value

    @field_validator("apparmor_profile")
    @classmethod
    def _profile_name(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value) or "\0" in value:
            raise ValueError("must be a profile name")
        return value


class NetworkConfig(_Section):
    cni_config_dir: Path = Field(
        Path("/etc/cni/net.d"),
        description="CNI network configs; the first valid one by file name is used, unless "
        "cni_default_network names one (flag --cni-config-dir).",
    )
    cni_plugin_dirs: list[Path] = Field(
        [Path("/opt/cni/bin"), Path("/usr/lib/cni")],
        description="Where CNI plugins are looked up, in order (flag --cni-plugin-dir, "
        "repeatable).",
    )
    cni_default_network: str = Field(
        "", description="Name of the CNI network to use; empty means the first valid config."
    )
    cni_timeout: float = Field(
        60.0, gt=0,
        description="Seconds one CNI plugin may take for an ADD, DEL or CHECK; then it is "
        "killed with what it started, and a failed ADD is rolled back (CRI-O waits 4 min).",
    )


class ImageConfig(_Section):
    registries_conf: Path = Field(
        Path("/etc/containers/registries.conf"),
        description="containers-registries.conf(5) file: search registries, mirrors, "
        "insecure and blocked registries; a missing file means defaults "
        "(flag --registries-conf).",
    )
    registries_certs_dir: Path = Field(
        Path("/etc/containers/certs.d"),
        description="Per-registry TLS material, as containers-certs.d(5): "
        "<dir>/<host[:port]>/*.crt are extra CA certificates.",
    )
    max_concurrent_downloads: int = Field(
        3, ge=1, le=64, description="Layers downloaded at once, over all pulls."
    )
    pull_progress_timeout: float = Field(
        300.0,
        ge=0,
        description="Seconds a pull may make no progress before it fails; 0 turns it off.",
    )
    max_manifest_size: int = Field(
        4 * MIB,
        ge=64 * 1024,
        description="Largest manifest, image index or image config accepted, in bytes; a "
        "larger one fails the pull with RESOURCE_EXHAUSTED.",
    )
    max_layer_size: int = Field(
        0,
        ge=0,
        description="Largest uncompressed layer accepted, in bytes, counted while the layer "
        "streams (a small gzip or zstd blob that expands past it is stopped there: a zip "
        "bomb); a larger one fails the pull with RESOURCE_EXHAUSTED. 0 means no limit, as "
        "in CRI-O and containerd.",
    )
    max_layer_entries: int = Field(
        0,
        ge=0,
        description="Most tar entries (files, directories, links...) one layer may hold; "
        "more fail the pull with RESOURCE_EXHAUSTED. 0 means no limit.",
    )
    pinned_images: list[str] = Field(
        [],
        description="Images kubelet's image garbage collection keeps: ListImages and "
        "ImageStatus report them pinned. Each entry is an exact name "
        "(registry.k8s.io/pause:3.10), a glob ending in * (registry.k8s.io/pause*) or a "
        "keyword between two * (*pause*), matched against every tag and digest name of an "
        "image as CRI-O's pinned_images (docs/images.md). Re-read on SIGHUP.",
    )
    signature_policy: AbsolutePath = Field(
        Path("/etc/containers/policy.json"),
        description="containers-policy.json(5) file every pull is checked against (read at "
        "each pull: edits need no SIGHUP). A missing or invalid file fails pulls, as in "
        "CRI-O.",
    )
    signature_policy_dir: AbsolutePath = Field(
        Path("/etc/moorage/policies"),
        description="Per-namespace policies, as CRI-O's signature_policy_dir: "
        "<dir>/<namespace>.json, when it exists, replaces signature_policy for the pulls "
        "kubelet makes for pods of that namespace.",
    )

    @field_validator("pinned_images")
    @classmethod
    def _pin_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            inner = pattern.removeprefix("*").removesuffix("*") if len(pattern) > 1 else ""
            if not inner or any(c.isspace() for c in pattern) or "*" in inner:
                raise ValueError(
                    f"{pattern!r}: an image name, a name ending in * (glob) or a word between "
                    "two * (keyword); * elsewhere, or nothing but *, is not a pattern"
                )
            if pattern.startswith("*") and not pattern.endswith("*"):
                raise ValueError(f"{pattern!r}: a leading * needs a trailing one (*keyword*)")
        return value


class CdiConfig(_Section):
    spec_dirs: list[AbsolutePath] = Field(
        [Path("/etc/cdi"), Path("/var/run/cdi")],
        description="Directories of CDI spec files (*.json, *.yaml) defining the devices "
        "that containers name in CDI_devices or cdi.k8s.io/ annotations; a device defined "
        "in a later directory wins. Files are read again when they change; the list is "
        "re-read on SIGHUP.",
    )


class MetricsConfig(_Section):
    enable: bool = Field(
        False, description="Serve Prometheus metrics over HTTP (flag --enable-metrics)."
    )
    host: str = Field(
        "127.0.0.1",
        description="Address the metrics endpoint listens on; loopback by default "
        "(flag --metrics-host).",
    )
    port: int = Field(
        9090, ge=0, le=65535,
        description="Port of the metrics endpoint, GET /metrics; 0 picks a free one "
        "(flag --metrics-port).",
    )


class Config(_Section):
    root: AbsolutePath = Field(
        Path("/var/lib/moorage"),
        description="Persistent state: images, container and sandbox records (flag --root).",
    )
    runroot: AbsolutePath = Field(
        Path("/run/moorage"),
        description="Volatile state, empty after a reboot (flag --runroot).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Daemon log level (flag --log-level)."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Daemon log lines: key=value text or one JSON object (flag --log-format).",
    )
    api: ApiConfig = Field(default_factory=ApiConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    cdi: CdiConfig = Field(default_factory=CdiConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    runtimes: dict[str, RuntimeHandler] = Field(
        default_factory=lambda: {"runc": RuntimeHandler()},
        description="Runtime handlers by name (CRI runtime_handler); [runtimes.<name>] tables.",
    )

    @model_validator(mode="before")
    @classmethod
    def _keep_default_handler(cls, data: Any) -> Any:
        """[runtimes.<name>] tables add handlers to the built-in runc one (as CRI-O's)."""
        if isinstance(data, dict) and isinstance(data.get("runtimes"), dict):
            data = {**data, "runtimes": {"runc": {}, **data["runtimes"]}}
        return data

    @model_validator(mode="after")
    def _default_runtime_known(self) -> Config:
        if self.runtime.default_runtime not in self.runtimes:
            raise ValueError(
                f"runtime.default_runtime {self.runtime.default_runtime!r} is not a configured "
                f"runtime handler (have: {', '.join(sorted(self.runtimes)) or 'none'})"
            )
        return self

    def runtime_root(self, handler: str) -> Path:
        root = self.runtimes[handler].runtime_root
        return root if root is not None else self.runroot / "runtimes" / handler


#: Command-line flags that override a key, as CRI-O names them: flag -> dotted key.
FLAG_KEYS: dict[str, str] = {
    "listen": "api.listen",
    "stream_address": "api.stream_address",
    "stream_port": "api.stream_port",
    "root": "root",
    "runroot": "runroot",
    "registries_conf": "image.registries_conf",
    "log_level": "log_level",
    "log_format": "log_format",
    "cgroup_manager": "runtime.cgroup_manager",
    "default_runtime": "runtime.default_runtime",
    "cni_config_dir": "network.cni_config_dir",
    "cni_plugin_dir": "network.cni_plugin_dirs",
    "enable_metrics": "metrics.enable",
    "metrics_host": "metrics.host",
    "metrics_port": "metrics.port",
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read: {e.strerror}") from e


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *tables, key = dotted.split(".")
    node = data
    for table in tables:
        node = node.setdefault(table, {})
    node[key] = value


def _describe(error: ValidationError, sources: list[Path]) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        elif not key:
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"key {key!r}: {msg} (got {err.get('input')!r})")
    where = ", ".join(str(s) for s in sources) or "flags"
    return f"invalid configuration ({where}): " + "; ".join(lines)


def load(
    config_file: Path | None = None,
    config_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build the effective config.

    ``config_file``/``config_dir`` of ``None`` mean the defaults, which may be absent;
    files named explicitly must exist. ``overrides`` maps flag names of ``FLAG_KEYS``
    (or dotted keys) to values; ``None`` values are ignored.
    """
    data: dict[str, Any] = {}
    sources: list[Path] = []
    main = config_file or DEFAULT_CONFIG
    if config_file is not None or main.exists():
        data = _read_toml(main)
        sources.append(main)
    drop_dir = config_dir or DEFAULT_CONFIG_DIR
    if config_dir is not None and not drop_dir.is_dir():
        raise ConfigError(f"config dir {drop_dir}: not a directory")
    if drop_dir.is_dir():
        for path in sorted(drop_dir.glob("*.toml")):
            data = _merge(data, _read_toml(path))
            sources.append(path)
    for name, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, FLAG_KEYS.get(name, name), value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, sources)) from e


def _toml_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_section(model: BaseModel, lines: list[str]) -> list[tuple[str, BaseModel]]:
    tables: list[tuple[str, BaseModel]] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            tables.append((name, value))
            continue
        if isinstance(value, dict):
            if field.description:
                lines.append(f"# {name}: {field.description}")
            tables += [(f"{name}.{key}", sub) for key, sub in value.items()]
            continue
        if field.description:
            lines.append(f"# {field.description}")
        if value is None:
            lines.append(f"# {name} =")
        elif name == "socket_mode":
            lines.append(f"{name} = 0o{value:o}")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return tables


def render(config: Config) -> str:
    """The effective config as commented TOML, loadable again as a config file."""
    lines = ["# moorage configuration (effective values)", ""]
    tables = _render_section(config, lines)
    for name, section in tables:
        lines += ["", f"[{name}]"]
        _render_section(section, lines)
    return "\n".join(lines) + "\n"


def as_info(config: Config) -> dict[str, Any]:
    """The config as plain JSON-able data, for ``Status`` verbose info."""
    result: dict[str, Any] = config.model_dump(mode="json")
    return result


def _rows(model: type[BaseModel], prefix: str, flags: dict[str, str]) -> list[str]:
    rows = []
    instance_defaults = model.model_validate({})
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(instance_defaults, name)
        if isinstance(value, BaseModel):
            rows += _rows(type(value), f"{key}.", flags)
            continue
        if isinstance(value, dict):
            rows.append(f"| `{key}.<name>` | | runc | {field.description or ''} |")
            rows += _rows(RuntimeHandler, f"{key}.<name>.", flags)
            continue
        flag = flags.get(key, "")
        shown = "unset" if value is None else _toml_value(value)
        if name == "socket_mode":
            shown = f"0o{value:o}"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {f'`--{flag}`' if flag else ''} | `{shown}` | {description} |")
    return rows


def reference_table() -> str:
    """Every key with its flag, default and meaning: the table of docs/configuration.md."""
    flags = {key: name.replace("_", "-") for name, key in FLAG_KEYS.items()}
    head = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    return "\n".join(head + _rows(Config, "", flags)) + "\n"
