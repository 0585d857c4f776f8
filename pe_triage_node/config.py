"""Node configuration: one TOML file loaded into pydantic models at start-up.

Precedence (highest first): environment variables ``PETRIAGE_<SECTION>__<KEY>``
(e.g. ``PETRIAGE_RECEIVER__PORT=11113``), the TOML file, built-in defaults.
Every path is made absolute once, when the configuration is loaded: state
paths (spool, outputs, the SQLite database) relative ones under ``node.var_dir``,
``node.var_dir`` and file paths (TLS, weights) relative ones against the working
directory of the process that loaded it. So the built-in defaults keep all state
under ``./var/``, and nothing later depends on the current directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pe_triage_node.errors import ConfigError
from pe_triage_node.patterns import compile_pattern
from pe_triage_node.resources import demo_manifest

DEFAULT_CONFIG_PATH = Path("config/node.toml")
ENV_PREFIX = "PETRIAGE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): {value!r}")
    return value.strip()


def check_regex(value: str | None) -> str | None:
    """A pydantic check: ``value`` compiles as a regular expression (or is unset); see :mod:`.patterns`."""
    if value is not None:
        compile_pattern(value)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSection(_Section):
    var_dir: Path = Path("var")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"


class TLSSection(_Section):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    verify_client: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSection:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs certificate and private_key")
        if self.verify_client and self.ca_certificates is None:
            raise ValueError("tls.verify_client needs ca_certificates")
        return self


class ReceiverSection(_Section):
    ae_title: str = "PETRIAGE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    check_called_aet: bool = True
    max_associations: int = Field(16, ge=1, le=1024)
    processes: int = Field(1, ge=1, le=64)
    maximum_pdu_size: int = Field(131072, ge=4096, le=16777216)
    max_pending_connections: int = Field(64, ge=1, le=4096)
    min_free_mb: int = Field(1024, ge=0)
    network_timeout_s: float = Field(60.0, gt=0)
    acse_timeout_s: float = Field(10.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    tls: TLSSection = Field(default_factory=TLSSection)

    @field_validator("ae_title")
    @classmethod
    def _check_own_ae(cls, v: str) -> str:
        return _check_ae(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed(cls, v: list[str]) -> list[str]:
        return [_check_ae(a) for a in v]


class SpoolSection(_Section):
    path: Path = Path("spool")
    fsync: bool = True


class DatabaseSection(_Section):
    url: SecretStr = SecretStr("sqlite:///{var_dir}/node.db")
    echo: bool = False


class AssemblySection(_Section):
    quiet_period_s: float = Field(30.0, gt=0)
    contiguity_factor: float = Field(1.5, gt=1.0)
    check_interval_s: float = Field(2.0, gt=0)


class SelectionSection(_Section):
    """Declarative rules that choose the CTPA series of a study (one per study)."""

    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    sop_classes: list[str] = Field(
        default_factory=lambda: ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"]
    )
    image_type_required: list[str] = Field(default_factory=lambda: ["ORIGINAL", "AXIAL"])
    min_slices: int = Field(30, ge=1)
    max_slices: int = Field(2000, ge=1)
    max_slice_thickness_mm: float = Field(3.0, gt=0)
    series_description_include: str | None = None
    series_description_exclude: str | None = r"(?i)\b(scout|topogram|localizer|dose|mip|mpr|lung)\b"
    study_description_include: str | None = None
    protocol_name_include: str | None = None
    kernel_exclude: str | None = None
    soft_tissue_kernel: str = r"(?i)^(B[rfv]?|I[rfv]?)?[2-4]\d|standard|soft|^[BCD]$|^FC0?[1-4]\d?$|^FC1\d$"

    @field_validator(
        "series_description_include",
        "series_description_exclude",
        "study_description_include",
        "protocol_name_include",
        "kernel_exclude",
        "soft_tissue_kernel",
    )
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return check_regex(v)


class InferenceSection(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    weights_manifest: Path | None = None
    lung_crop: Literal["auto", "lungmask", "threshold"] = "auto"
    lungmask_weights: Path | None = None
    batch_size: int = Field(8, ge=1, le=256)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    require_contrast: bool = True

    @property
    def manifest(self) -> Path:
        """The weights to run: ``weights_manifest``, else the shipped demo weights."""
        return self.weights_manifest or demo_manifest()


class QueueSection(_Section):
    lease_s: float = Field(120.0, gt=0)
    heartbeat_s: float = Field(15.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    poll_interval_s: float = Field(0.1, gt=0)
    max_wait_s: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> QueueSection:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("queue.heartbeat_s must be shorter than queue.lease_s")
        return self


class WebSection(_Section):
    """The web console (worklist, study pages, rules editor, operations, /metrics)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Send cookies only over HTTPS (set true behind a TLS-terminating proxy).
    secure_cookies: bool = False
    session_idle_minutes: int = Field(120, ge=1, le=7 * 24 * 60)
    session_max_hours: int = Field(12, ge=1, le=24 * 31)
    worklist_refresh_s: int = Field(15, ge=2, le=3600)
    worklist_limit: int = Field(500, ge=10, le=10_000)


PriorityName = Literal["STAT", "URGENT", "ROUTINE"]


class _Destination(_Section):
    """What every ``[[export.destinations]]`` entry has: a unique name, its kind, the lowest priority it gets."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # Results below this priority are not sent here ("ROUTINE": every result).
    min_priority: PriorityName = "ROUTINE"


class DestinationSection(_Destination):
    """A PACS (or other Storage SCP) that gets the SR, SCs and KOS by C-STORE (``kind = "dicom"``, the default)."""

    kind: Literal["dicom"] = "dicom"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    # CA bundle that signed the peer's certificate (None: the system store).
    ca_certificates: Path | None = None
    # Our client certificate and key, when the peer requires one.
    certificate: Path | None = None
    private_key: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _check_dest_ae(cls, v: str) -> str:
        return _check_ae(v)

    @model_validator(mode="after")
    def _key_with_certificate(self) -> DestinationSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("destination certificate and private_key go together")
        return self


class _HTTPDestination(_Destination):
    """A destination reached over HTTP(S): base URL, optional bearer token, CA bundle, timeout."""

    url: str = Field(pattern=r"^https?://[^\s]+$")
    # Sent as "Authorization: Bearer <token>"; masked in check-config, never logged.
    bearer_token: SecretStr | None = None
    # CA bundle that signed the server's certificate (None: the system store).
    ca_certificates: Path | None = None
    # Seconds to connect and to wait for the answer.
    timeout_s: float = Field(30.0, gt=0)


class DicomWebDestination(_HTTPDestination):
    """A DICOMweb archive that gets the SR, SCs and KOS by STOW-RS (``kind = "dicomweb"``; ``url``: the service root)."""

    kind: Literal["dicomweb"]


class FHIRDestination(_HTTPDestination):
    """A FHIR R4 server that gets one transaction Bundle per result (``kind = "fhir"``; ``url``: the base URL)."""

    kind: Literal["fhir"]
    # System (URI) of the patient identifiers the site's FHIR server uses for the DICOM PatientID (None: no system).
    patient_identifier_system: str | None = None


class HL7Destination(_Destination):
    """A RIS/EHR interface engine that gets an HL7 v2.5.1 ORU^R01 per result over MLLP (``kind = "hl7"``)."""

    kind: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    # MSH-3/4 (us) and MSH-5/6 (the receiver), as the interface engine expects them.
    sending_application: str = Field("PETRIAGE", max_length=180)
    sending_facility: str = Field("", max_length=180)
    receiving_application: str = Field("", max_length=180)
    receiving_facility: str = Field("", max_length=180)
    # MSH-11: "P" production, "T" training, "D" debugging (HL7 table 0103).
    processing_id: Literal["P", "T", "D"] = "P"
    # Seconds to connect, and to wait for the ACK after sending.
    timeout_s: float = Field(30.0, gt=0)


#: One ``[[export.destinations]]`` entry, chosen by its ``kind`` (absent: ``"dicom"``).
Destination = Annotated[
    DestinationSection | DicomWebDestination | FHIRDestination | HL7Destination, Field(discriminator="kind")
]


class ExportSection(_Section):
    """Results out: DICOM (C-STORE, STOW-RS), HL7 v2 and FHIR destinations, retries, dead-letter, optional webhook."""

    calling_ae_title: str = "PETRIAGE"
    destinations: list[Destination] = Field(default_factory=list)
    max_attempts: int = Field(8, ge=1)
    backoff_base_s: float = Field(5.0, gt=0)
    backoff_cap_s: float = Field(600.0, gt=0)
    poll_interval_s: float = Field(0.1, gt=0)
    lease_s: float = Field(120.0, gt=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    outputs_dir: Path = Path("outputs")
    uid_prefix: str = Field("1.2.826.0.1.3680043.10.1453.1.", pattern=r"^([1-9][0-9]*|0)(\.([1-9][0-9]*|0))*\.$", max_length=40)
    webhook_url: str | None = Field(None, pattern=r"^https?://")
    webhook_min_priority: PriorityName = "URGENT"
    webhook_timeout_s: float = Field(5.0, gt=0)

    @field_validator("calling_ae_title")
    @classmethod
    def _check_calling_ae(cls, v: str) -> str:
        return _check_ae(v)

    @field_validator("destinations", mode="before")
    @classmethod
    def _dicom_by_default(cls, v: Any) -> Any:
        """A destination without ``kind`` is a DICOM one (configurations written before there were others)."""
        if isinstance(v, list):
            return [{"kind": "dicom", **d} if isinstance(d, dict) and "kind" not in d else d for d in v]
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> ExportSection:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("export.destinations names must be unique")
        return self


class WorkerSection(_Section):
    """The inference worker (``pe-triage worker``) and the processes ``pe-triage run`` starts."""

    # Worker processes `pe-triage run` starts on this machine (each loads the model once).
    processes: int = Field(1, ge=1, le=64)
    # Retry delay after failed attempt n of an inference job: base * 2^(n-1), at most cap.
    backoff_base_s: float = Field(10.0, gt=0)
    backoff_cap_s: float = Field(600.0, gt=0)
    # Write PNG copies of the Secondary Captures for the web console's study page.
    write_pngs: bool = True
    # MiB of slices an idle worker decodes while their series still arrives (HU, in memory;
    # a 300-slice 512 x 512 series takes 300); its job then starts from them. 0: off.
    prefetch_mb: int = Field(768, ge=0, le=65536)
    # MiB the worker maps while idle and keeps in its heap, with all the memory its jobs free
    # (glibc), for the next job: memory a process never touched costs up to 2.5 ms a MiB on a
    # VM (0.6 s for a 300-slice volume). The worker holds its peak. 0: glibc's default.
    heap_reserve_mb: int = Field(1024, ge=0, le=2047)
    # Start the web console with `pe-triage run`.
    run_web: bool = True


class NodeConfig(BaseSettings):
    """The effective configuration of one node process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=False
    )

    node: NodeSection = Field(default_factory=NodeSection)
    receiver: ReceiverSection = Field(default_factory=ReceiverSection)
    spool: SpoolSection = Field(default_factory=SpoolSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    assembly: AssemblySection = Field(default_factory=AssemblySection)
    selection: SelectionSection = Field(default_factory=SelectionSection)
    inference: InferenceSection = Field(default_factory=InferenceSection)
    queue: QueueSection = Field(default_factory=QueueSection)
    web: WebSection = Field(default_factory=WebSection)
    export: ExportSection = Field(default_factory=ExportSection)
    worker: WorkerSection = Field(default_factory=WorkerSection)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init kwargs); init beats defaults.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _absolute_paths(self) -> NodeConfig:
        """Make every configured path absolute, once (see the module docstring)."""
        cwd = Path.cwd()
        self.node.var_dir = _absolute(self.node.var_dir, cwd)
        self.spool.path = _absolute(self.spool.path, self.node.var_dir)
        self.export.outputs_dir = _absolute(self.export.outputs_dir, self.node.var_dir)
        url = self.database.url.get_secret_value()
        if url.startswith("sqlite:///") and "{var_dir}" not in url:
            db = url.removeprefix("sqlite:///")
            if db and db != ":memory:" and not db.startswith("/"):
                self.database.url = SecretStr("sqlite:///" + str(_absolute(Path(db), cwd)))
        files: list[BaseModel] = [self.receiver.tls, self.inference, *self.export.destinations]
        for section in files:
            for name, value in vars(section).items():
                if isinstance(value, Path):
                    setattr(section, name, _absolute(value, cwd))
        return self

    # -- resolved paths -------------------------------------------------
    def resolve(self, path: Path) -> Path:
        """A configured path, relative ones taken under ``node.var_dir``."""
        return _absolute(path, self.node.var_dir)

    @property
    def spool_dir(self) -> Path:
        return self.resolve(self.spool.path)

    @property
    def database_url(self) -> str:
        return self.database.url.get_secret_value().replace("{var_dir}", str(self.node.var_dir))

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked."""
        data = self.model_dump(mode="json")
        data["database"]["url"] = _mask_url(self.database_url)
        return data


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1****@", url)


def load_config(path: Path | None = None) -> NodeConfig:
    """Load the node configuration, or raise :class:`ConfigError` naming key, value and reason.

    ``path=None`` uses ``./config/node.toml`` when present, else built-in defaults.
    """
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        cfg = NodeConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc
    return cfg


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = str(path) if path else "built-in defaults"
    lines = [f"invalid configuration ({where}, environment {ENV_PREFIX}*):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = "****" if any(word in key for word in ("url", "password", "token")) else repr(value)
        lines.append(f"  {key} = {shown}: {err['msg']}")
    return "\n".join(lines)


def env_overrides() -> dict[str, str]:
    """Names of the PETRIAGE_* variables in effect (values not shown: they may be secrets)."""
    return {k: "set" for k in os.environ if k.startswith(ENV_PREFIX)}
