"""The node's configuration: one pydantic model of the whole TOML file.

This module is the only place where defaults live. ``load_config`` reads a TOML file and
returns a validated :class:`NodeConfig`; ``ConfigError`` carries messages that name the bad field
(``rules[2].destinations: unknown destination 'PACS2'``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


def bundled_models_dir() -> Path:
    """Where the models shipped with the project are: ``onnx_models/`` of a source checkout (or an editable
    install of one), else the package data of an installed wheel (``dicom_node/bundled_models/``)."""
    checkout = Path(__file__).resolve().parents[1] / "onnx_models"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parent / "bundled_models"


#: Models shipped with the project (see :func:`bundled_models_dir`).
BUNDLED_MODELS_DIR = bundled_models_dir()

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII but backslash, 1..16 chars


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return stripped


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Strict):
    """``[node]``: this node's own DICOM identity and storage."""

    ae_title: str = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    data_dir: Path = Path("/var/lib/dicom-node")
    #: Root for every UID the node creates (end it with a digit; a '.' is added). None: pydicom's root. An arc
    #: of the organisation's root kept for this node alone: every series under it is taken for the node's own
    #: output and never processed (the loop guard), so a root other systems also use would hide their series.
    uid_root: str | None = None
    #: Refuse associations whose called AE title is not ``ae_title``.
    require_called_ae: bool = True
    #: Largest P-DATA PDU the node accepts, bytes: advertised to the peer and enforced (a longer PDU
    #: aborts the association). 0: none advertised; a PDU may then be as long as ``[limits] max_object_mb``.
    max_pdu_size: int = Field(default=1048576, ge=0, le=0xFFFFFFFF)
    #: Associations served at the same time (counted from their A-ASSOCIATE-RQ on; connections that
    #: have not sent one yet do not take a slot, see ``[limits]``).
    max_associations: int = Field(default=16, ge=1)
    #: An association with no PDU for this long is aborted.
    network_timeout_s: float = Field(default=60.0, gt=0)
    #: A series closes after this many seconds without a new instance, even if not whole.
    idle_timeout_s: float = Field(default=60.0, gt=0)
    #: How often the idle-timeout sweep runs.
    sweep_interval_s: float = Field(default=5.0, gt=0)
    #: A series found whole when an association ends is closed this long after, unless an instance arrived
    #: meanwhile: a sender that splits a series over several associations (a contiguous part looks whole) gets
    #: one series version, not one per part. 0: closed at once.
    release_grace_s: float = Field(default=2.0, ge=0)
    #: Make each received object durable before acknowledging it (keep on in production).
    fsync: bool = True
    #: With ``fsync``: each received object is made durable by one synchronous append to the receipt log
    #: (``data_dir/receipts``), written while the object is parsed; its spool file and journal row are synced in
    #: batches later (dicom_node.receipts). ``false``: the spool file, its directory and the journal row are each
    #: synced before the response, one after the other (slower; the same guarantee).
    receipt_log: bool = True
    #: Several ``serve --role receiver`` processes of this data directory listen on the same ports
    #: (``SO_REUSEPORT``: the kernel spreads the associations over them), to use more cores for receiving.
    #: Only receivers share (``all`` keeps the data directory to itself); on other machines they need no port sharing.
    reuse_port: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: ``text``: one readable line per record; ``json``: one JSON object per line (time, level, logger,
    #: message, thread; the traceback as ``exc``), for a log shipper.
    log_format: Literal["text", "json"] = "text"
    #: Loggers of libraries (pynetdicom, apscheduler, highdicom, PIL, onnxruntime) log at this level or above:
    #: their INFO lines are noise in a hospital's log. DEBUG shows everything.
    library_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str | None) -> str | None:
        if value is None:
            return None
        root = value.rstrip(".")
        if not re.fullmatch(r"[12](\.(0|[1-9][0-9]*))+", root) or len(root) > 40:
            raise ValueError(f"{value!r} is not a valid UID root (dotted digits, at most 40 characters)")
        if root.count(".") < 3:  # "2.25" (every UUID-derived UID), "1.2.840" (every ANSI member's)
            raise ValueError(f"{value!r} is too short a UID root: the node takes every series under it for its own "
                             "output and never processes it; use an arc of your organisation's root kept for this "
                             "node alone (at least 4 components)")
        return root + "."


class AuditSettings(_Strict):
    """``[audit]``: the audit trail, one JSON object per line: each association (calling AE title, host, TLS,
    what it stored, per study and series, with the patient ID), each refusal, each delivery (destination,
    objects, outcome) and each operator action (retry, reprocess, purge; by which user). Written apart from
    the log so that a hospital can ship it to its log server; reopened when logrotate moves it."""

    enabled: bool = True
    #: The audit file; relative paths are under ``[node] data_dir``.
    path: Path = Path("audit.jsonl")


class LimitSettings(_Strict):
    """``[limits]``: what one peer may cost the node while it sends (memory, time, connections)."""

    #: Largest data set the node accepts, MB (as received, and once inflated for Deflate); a larger one
    #: is answered 0xA700 and its fragments are dropped as they arrive.
    max_object_mb: float = Field(default=512.0, gt=0)
    #: Data sets being received (not yet answered) on all associations together, MB; an object that
    #: would pass it is answered 0xA700 (the sender retries later).
    receive_memory_mb: float = Field(default=2048.0, gt=0)
    #: A connection must have sent its whole A-ASSOCIATE-RQ this many seconds after it opened.
    acse_timeout_s: float = Field(default=10.0, gt=0)
    #: A PDU must arrive whole this many seconds after its first byte (a slow sender is aborted).
    pdu_timeout_s: float = Field(default=30.0, gt=0)
    #: Open TCP connections, associated or not; another is closed at once.
    max_connections: int = Field(default=64, ge=1)
    #: Low disk watermark, MB: while the file system holding ``[node] data_dir`` has less free space than
    #: this, every C-STORE is refused with 0xA700 (out of resources) before anything is written. 0: off.
    min_free_mb: float = Field(default=1024.0, ge=0)
    #: High disk watermark, MB: once refusing, C-STOREs are accepted again only when this much is free
    #: (at least ``min_free_mb``, so the node does not flip between refusing and accepting).
    resume_free_mb: float = Field(default=2048.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> LimitSettings:
        if self.receive_memory_mb < self.max_object_mb:
            raise ValueError("receive_memory_mb is smaller than max_object_mb (no object that large could arrive)")
        if self.resume_free_mb < self.min_free_mb:
            raise ValueError("resume_free_mb is smaller than min_free_mb (the node would accept again below the "
                             "level it refuses at)")
        return self


class TLSSettings(_Strict):
    """``[tls]``: DICOM TLS (PS3.15 B.1, BCP 195: TLS 1.2 or newer) on a port of its own, beside the plain one,
    and the node's certificate for destinations that ask for one (mutual TLS)."""

    #: Port of the TLS listener (2762 is DICOM's registered TLS port). None: no TLS listener.
    port: int | None = Field(default=None, ge=1, le=65535)
    #: The node's certificate (PEM; the chain after it) and its private key (PEM, not encrypted):
    #: presented by the TLS listener, and to destinations with ``tls = true`` as the client certificate.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: CA certificates (PEM) that client certificates must chain to. Set: clients may present one
    #: (verified); peers with ``tls_common_name`` must. Not set: client certificates are not asked for.
    ca_file: Path | None = None
    #: Mutual TLS: every association on the TLS port needs a client certificate chaining to ``ca_file``.
    require_client_cert: bool = False
    #: Oldest TLS version accepted and offered; TLS 1.0 and 1.1 are never allowed.
    min_version: Literal["1.2", "1.3"] = "1.2"
    #: Seconds a client has for the TLS handshake (a slow one does not hold the listener).
    handshake_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> TLSSettings:
        if self.port is not None and (self.cert_file is None or self.key_file is None):
            raise ValueError("a TLS listener (port) needs cert_file and key_file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA client certificates must chain to)")
        return self


class HTTPSettings(_Strict):
    """``[http]``: the node's HTTP server: ``/health``, ``/metrics`` (Prometheus) and the dashboard (``/``)."""

    #: Address to listen on. The dashboard shows patient data: keep it on 127.0.0.1 (a reverse proxy with TLS in
    #: front for remote readers); another address needs ``admin_password_file`` or ``dashboard = false``.
    host: str = "127.0.0.1"
    #: Port to listen on; 0: no HTTP server (no health, metrics or dashboard; `status` cannot tell whether the
    #: node runs).
    port: int = Field(default=8080, ge=0, le=65535)
    #: Serve the dashboard at ``/`` (``/health`` and ``/metrics`` are served either way and hold no patient data).
    dashboard: bool = True
    #: A file holding the dashboard's password (one line, at least 8 characters; keep it 0600, owned by the node's
    #: user; read when the node starts). Set: the dashboard asks for it (HTTP Basic, user ``admin_user``) and
    #: offers the retry and reprocess actions. None: the dashboard is read-only and open to whoever reaches
    #: ``host``:``port``.
    admin_password_file: Path | None = None
    #: User name that goes with the password.
    admin_user: str = Field(default="admin", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    #: Studies shown on the dashboard (the most recent first).
    dashboard_studies: int = Field(default=50, ge=1, le=1000)
    #: Host names the dashboard answers besides ``host`` and the loopback names (the ``Host`` header of each
    #: request must be one of them, so that a web page cannot read the dashboard by DNS rebinding): e.g. the
    #: public name of a reverse proxy in front. Needs ``admin_password_file`` (the proxy brings the network in).
    allowed_hosts: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _loopback_or_password(self) -> HTTPSettings:
        loopback = self.host == "localhost" or is_loopback_address(self.host)
        if self.port and self.dashboard and not loopback and self.admin_password_file is None:
            raise ValueError(f"host {self.host!r} is not a loopback address: the dashboard shows patient data, so "
                             "set admin_password_file (or dashboard = false)")
        if self.port and self.dashboard and self.allowed_hosts and self.admin_password_file is None:
            # a reverse proxy in front brings the whole network to the loopback address
            raise ValueError("allowed_hosts lets the dashboard be reached by other names (a reverse proxy in front): "
                             "it shows patient data, so set admin_password_file (or dashboard = false)")
        return self


def is_loopback_address(name: str) -> bool:
    """``name`` is a loopback IP address (127.0.0.0/8, ::1), written as one: not a host name that merely begins
    with ``127.`` (``127.0.0.1.nip.io`` resolves anywhere)."""
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Peer(_Strict):
    """``[[peers]]``: a scanner or PACS allowed to send to the node."""

    ae_title: str
    #: IP address or host name the association must come from; None accepts any host.
    host: str | None = None
    #: The peer must come over TLS (the ``[tls]`` port); on the plain port its associations are rejected.
    tls: bool = False
    #: Over TLS, the peer's verified client certificate must have this subject common name (mutual TLS
    #: for this peer even when ``[tls] require_client_cert`` is off). Implies ``tls``.
    tls_common_name: str | None = None

    _ae = field_validator("ae_title")(_check_ae)


class Destination(_Strict):
    """``[[destinations]]``: where the node's results go, by DICOM C-STORE (``protocol = "dimse"``, the default:
    ``ae_title``, ``host``, ``port``) or by DICOMweb STOW-RS (``protocol = "stow-rs"``: ``url``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    protocol: Literal["dimse", "stow-rs"] = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    #: Calling AE title used towards this destination (default: the node's).
    calling_ae_title: str | None = None
    #: Associations the node opens to this destination at the same time (the outbox is shared out
    #: between them). Two file results in about 60 % of the time of one (bench P2, Orthanc); a destination that
    #: refuses the second gets everything over the first, and none is tried again for 10 minutes.
    max_associations: int = Field(default=2, ge=1, le=16)
    #: Connect with DICOM TLS (TLS 1.2 or newer, ``[tls] min_version``); the destination's certificate is
    #: verified against ``tls_ca_file`` (else the system's CAs) and its name against ``tls_server_name``.
    tls: bool = False
    #: CA certificates that verify the destination's certificate (DICOM TLS, or an https ``url``).
    tls_ca_file: Path | None = None
    #: Name the destination's certificate must carry (default: ``host``).
    tls_server_name: str | None = None
    #: Present ``[tls] cert_file`` as client certificate (for destinations that require mutual TLS).
    tls_client_cert: bool = False
    #: STOW-RS: base URL of the DICOMweb service (``http://`` or ``https://``); objects are POSTed to
    #: ``{url}/studies``.
    url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    #: STOW-RS: HTTP basic authentication as this user, with the password read from ``password_file``.
    username: str | None = None
    password_file: Path | None = None
    #: STOW-RS: an OAuth bearer token read from this file (instead of basic authentication).
    token_file: Path | None = None
    #: STOW-RS: objects per request.
    stow_batch: int = Field(default=50, ge=1, le=1000)

    @field_validator("ae_title", "calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae(value)

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, value: str | None) -> str | None:
        # it would be printed by `config check`, logged with every retry and written to the audit trail
        if value is not None and "@" in value.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("a url must not hold a user or password: use username and password_file, or "
                             "token_file")
        return value

    @model_validator(mode="after")
    def _protocol_fields(self) -> Destination:
        dimse = {"ae_title": self.ae_title, "host": self.host, "port": self.port}
        web = {"url": self.url, "username": self.username, "password_file": self.password_file,
               "token_file": self.token_file}
        if self.protocol == "dimse":
            missing = [k for k, v in dimse.items() if v is None]
            if missing:
                raise ValueError(f"a DICOM (dimse) destination needs {', '.join(missing)}")
            extra = [k for k, v in web.items() if v is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for protocol = \"stow-rs\"")
            return self
        if self.url is None:
            raise ValueError("a stow-rs destination needs url")
        extra = [k for k, v in dimse.items() if v is not None] + (["tls"] if self.tls else [])
        if extra:
            raise ValueError(f"{', '.join(extra)}: only for protocol = \"dimse\" (an https url is TLS)")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        if self.username is not None and self.token_file is not None:
            raise ValueError("give either username and password_file or token_file")
        host = urlsplit(self.url).hostname or ""
        if ((self.username is not None or self.token_file is not None) and self.url.lower().startswith("http://")
                and not (host == "localhost" or is_loopback_address(host))):
            raise ValueError("a password or token would cross the network in clear text: use an https url (plain "
                             "http with credentials only to this machine, e.g. a local proxy)")
        return self

    @property
    def address(self) -> str:
        """Where the destination is, as people write it: ``AE@host:port`` or the STOW-RS URL."""
        if self.protocol == "stow-rs":
            return str(self.url)
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host  # an IPv6 address, as in a URL
        return f"{self.ae_title}@{host}:{self.port}"


class Rule(_Strict):
    """``[[rules]]``: which series go to which model, and where the results are sent.

    Rules are tried in order; the first whose every matcher holds wins.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    #: Case-insensitive regular expression searched in SeriesDescription.
    series_description: str
    #: ``synthesize``: run ``model`` to make a synthetic T1; ``volumetry``: the series is a real
    #: 3D T1 (rT1), measured as it is (segmented by ``[inference] segmenter``).
    action: Literal["synthesize", "volumetry"] = "synthesize"
    #: The synthesis model. For a volumetry rule, optional: a model whose own segmentation output
    #: measures the real T1, used only when ``[inference] segmenter`` is empty.
    model: str | None = None
    #: Also send DICOM SEG, a TID 1500 SR of regional volumes and a summary page (measured by
    #: ``[inference] segmenter``, or without one by the model's own segmentation output).
    volumetry: bool = True
    #: SeriesDescription of the outputs, after the nomenclature (sT1AAH, sT13DFLAIR, sT1CorT2, rT1).
    output_name: str = Field(pattern=r"^[A-Za-z0-9_ .-]{1,48}$")
    #: Destination names; None sends to every configured destination.
    destinations: list[str] | None = None
    # Optional matchers on other tags.
    modality: str | None = "MR"
    #: Every value listed must be in ImageType (case-insensitive).
    image_type: list[str] = Field(default_factory=list)
    #: No value listed may be in ImageType.
    image_type_excludes: list[str] = Field(default_factory=list)
    mr_acquisition_type: Literal["2D", "3D"] | None = None
    slice_thickness_min: float | None = None
    slice_thickness_max: float | None = None
    #: Case-insensitive regular expression that must not be found in SeriesDescription (kinds and copies the
    #: rule's model is not for: a scanner's unfiltered "_ND" copy, STIR among coronal T2s).
    series_description_excludes: str | None = None
    #: Case-insensitive regular expressions searched in BodyPartExamined, ProtocolName and StudyDescription
    #: (an absent attribute is the empty string: ``^$|head`` also takes a series that does not say).
    body_part_examined: str | None = None
    protocol_name: str | None = None
    study_description: str | None = None
    #: Case-insensitive regular expression searched in Manufacturer.
    manufacturer: str | None = None
    #: Calling AE titles this rule applies to (empty: any).
    calling_ae: list[str] = Field(default_factory=list)

    @field_validator("series_description", "series_description_excludes", "body_part_examined", "protocol_name",
                     "study_description", "manufacturer")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @field_validator("calling_ae")
    @classmethod
    def _calling_ae(cls, values: list[str]) -> list[str]:
        return [_check_ae(value) for value in values]  # compared with the stripped calling AE title

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.action == "volumetry" and not self.volumetry:
            raise ValueError("a rule with action 'volumetry' needs volumetry = true (it produces nothing else)")
        if self.action == "synthesize" and not self.model:
            raise ValueError("a rule with action 'synthesize' needs a model")
        if any(value.strip().upper() == "DERIVED" for value in self.image_type):
            raise ValueError("image_type DERIVED never matches: derived series (reformats, maps, the node's own "
                             "outputs) are not processed whatever the rules say")
        if (
            self.slice_thickness_min is not None
            and self.slice_thickness_max is not None
            and self.slice_thickness_min > self.slice_thickness_max
        ):
            raise ValueError("slice_thickness_min is larger than slice_thickness_max")
        return self


#: the bundled segmenter: brainchop's MeshNet (FreeSurfer aparc+aseg, real T1s), converted (onnx_models/README.md)
DEFAULT_SEGMENTER = "brainchop-aparc-aseg"


class InferenceSettings(_Strict):
    """``[inference]``: where models live and how onnxruntime runs them."""

    models_dir: Path = BUNDLED_MODELS_DIR
    #: The segmentation model that measures every real 3D T1, and the synthetic sT1 of a model whose manifest
    #: does not set ``measures_synthetic`` (every bundled synthesis model sets it: its own labels measure its
    #: sT1). Empty: each rule's model segments with its own output.
    segmenter: str | None = DEFAULT_SEGMENTER
    #: Synthesize each sT1 also from the input mirrored left-right and average the two (the mirrored one
    #: mirrored back), so that a mirrored head gives the mirrored sT1: no side bias from the synthesis
    #: network. Doubles the synthesis time. Overrides the manifests' ``input.mirror_average``; applies
    #: with a segmenter (a model's own labels come from one pass and would not match an averaged image).
    mirror_average: bool = True
    providers: Literal["auto", "cpu", "cuda"] = "auto"
    #: onnxruntime intra-op threads (0: onnxruntime's default, one per core).
    threads: int = Field(default=0, ge=0)
    #: Parallel jobs (each holds one volume in memory).
    workers: int = Field(default=1, ge=1, le=8)

    @field_validator("segmenter")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None


class VolumetrySettings(_Strict):
    """``[volumetry]``: what the measured volumes are compared with."""

    #: A site's normative table (CSV: code, age_min, age_max, sex, mean_ml, sd_ml; ``inference.norms``):
    #: the SR and ``report`` then give each structure with a matching row a z-score and percentile.
    #: None: no z-scores (no table is shipped).
    normative_table: Path | None = None

    @field_validator("normative_table")
    @classmethod
    def _readable_table(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None:
            from inference.norms import load_norms

            base = (info.context or {}).get("base")
            if base is not None and not value.is_absolute():  # (as :func:`anchored` takes every relative path)
                value = Path(base) / value

            try:
                load_norms(value)
            except OSError as exc:
                raise ValueError(f"cannot read normative table {value}: {exc.strerror}") from None
        return value


class JobSettings(_Strict):
    """``[jobs]``: how often a job may be started before it is given up."""

    #: Runs a job may start in all. A job found ``running`` at start-up was interrupted (the node
    #: stopped or crashed during it); it is run again while it has started fewer than this many
    #: times, otherwise failed as quarantined ("interrupted N times") so the queue moves on.
    max_attempts: int = Field(default=3, ge=1)
    #: When a routed series cannot be processed (unsuitable input, a model error, a job given up), send a
    #: "not processed" page (Secondary Capture, ``<output_name> NOT PROCESSED``) with the reason into the
    #: series' study, to the rule's destinations, so that a reader waiting for the result sees why none
    #: comes. Off: the failure shows only in ``status``, the log and the notifications.
    notify_failures_in_study: bool = True
    #: A job or follow-up is claimed by one worker with a lease of this many seconds, renewed every third of it
    #: while it runs; a claim whose lease expired (its worker died or stalled that long) is queued again and
    #: taken over by another worker (``serve --role worker``), counting as an interrupted run.
    lease_s: float = Field(default=60.0, ge=1.0)
    #: How often a worker process (``serve --role worker``) looks in the journal for queued work when idle.
    poll_interval_s: float = Field(default=1.0, gt=0)
    #: A run that stays this long in one stage (loading, a model, writing...) is hung (native code that never
    #: returns): the process's health fails (liveness), systemd's watchdog restarts it, and the run is
    #: interrupted, counted against ``max_attempts``; its lease alone would be renewed for ever.
    max_stage_s: float = Field(default=3600.0, gt=0)


class ExecutorSettings(_Strict):
    """``[executor]``: what runs the jobs. ``thread`` (the default): the node's own threads (``serve --role all``)
    or worker processes polling the journal (``--role receiver`` with ``--role worker``). ``celery``: the receiver
    publishes each queued job and follow-up to a Celery queue on a Redis broker, and ``serve --role worker``
    processes (on any machine that shares the journal and data directory) consume it
    (:mod:`dicom_node.celery_app`); the journal's claims keep every run to one worker."""

    kind: Literal["thread", "celery"] = "thread"
    #: The Redis broker (``redis://host:port/db``, or ``rediss://`` for TLS); put no password here.
    broker_url: str = Field(default="redis://127.0.0.1:6379/0", pattern=r"^rediss?://[^@\s]+$")
    #: A file holding the broker's password (one line; keep it 0600), read when the process starts.
    broker_password_file: Path | None = None
    #: First part of every queue name (``<prefix>.cuda.<models>``, ``<prefix>.cpu``, ``<prefix>.any``) and of the
    #: workers' announcements in Redis: sites sharing one broker use different prefixes.
    queue_prefix: str = Field(default="dicom_node", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    #: With ``celery``: how often a worker also looks in the journal for queued work (the safety net for a message
    #: lost, or published while the broker was down) and requeues runs whose lease expired.
    poll_interval_s: float = Field(default=30.0, gt=0)
    #: A message taken by a worker that died unacknowledged is delivered again after this long (Redis'
    #: ``visibility_timeout``); the journal's lease takes the run over long before, so this only tidies up.
    visibility_timeout_s: float = Field(default=3600.0, ge=60.0)
    #: A worker announces what it runs (device, models, queues) in Redis for this long, renewed every third of it;
    #: the receiver routes by the announcements it finds (re-read at most every ``announce_ttl_s / 3``).
    announce_ttl_s: float = Field(default=15.0, ge=3.0)
    #: A worker process's own Prometheus ``/metrics`` (step timings, tasks run and failed, its role and worker
    #: id) on this port of ``worker_metrics_host``; 0: none (``serve --metrics-port`` overrides it per process).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"


#: Events a webhook can be told about (``[[notifications]] events``).
NotificationEvent = Literal["job_failed", "delivery_failed", "disk_low"]
NOTIFICATION_EVENTS: tuple[str, ...] = ("job_failed", "delivery_failed", "disk_low")


class Notification(_Strict):
    """``[[notifications]]``: a webhook the node POSTs a JSON body to when one of ``events`` happens (from a
    background thread: a slow or failing webhook never holds the SCP or a job; its failure is logged once)."""

    #: http:// or https:// URL the JSON body is POSTed to.
    url: str = Field(pattern=r"^https?://[^\s]+$")
    #: Which events: ``job_failed`` (a job could not be processed), ``delivery_failed`` (an output failed for
    #: good after its last try), ``disk_low`` (free space below the watermark). Default: all of them.
    events: list[NotificationEvent] = Field(default_factory=lambda: list(NOTIFICATION_EVENTS))
    #: Extra HTTP headers (e.g. ``Authorization``); the body is always ``application/json``.
    headers: dict[str, str] = Field(default_factory=dict)
    #: Seconds one POST may take.
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    #: POSTs tried in all before the event is dropped (with one log line); waits 1, 2, 4 ... s between.
    tries: int = Field(default=3, ge=1, le=10)

    @field_validator("url")
    @classmethod
    def _port(cls, value: str) -> str:
        try:
            urlsplit(value).port  # noqa: B018 - raises for a port out of range or not a number
        except ValueError:
            raise ValueError("the url's port is not a number from 0 to 65535") from None
        return value

    @model_validator(mode="after")
    def _no_secret_in_clear(self) -> Notification:
        host = urlsplit(self.url).hostname or ""
        secret = any(name.lower() in ("authorization", "proxy-authorization", "cookie") or "token" in name.lower()
                     or "key" in name.lower() for name in self.headers)
        if secret and self.url.lower().startswith("http://") and not (host == "localhost"
                                                                       or is_loopback_address(host)):
            raise ValueError("a header holding a secret would cross the network in clear text: use an https url "
                             "(plain http with such headers only to this machine)")
        return self


class RetentionSettings(_Strict):
    """``[retention]``: when the node deletes what it received and produced (``dicom_node.retention``).

    A series is deleted (its received instances and the outputs of its jobs) only once nothing of it is
    still needed: not receiving, not waiting to be routed, no job queued, running or with outputs still to
    deliver, no delivery that failed for good (``dicom-node retry`` may still send it). The journal keeps
    what was received and sent, when and to whom; the files go.
    """

    #: Delete at all (the periodic sweep and ``dicom-node purge``). false: keep everything for good.
    enabled: bool = True
    #: Days after the last of a series' outputs was delivered (and its last instance was received)
    #: before its instances and outputs are deleted.
    delivered_days: float = Field(default=30.0, gt=0)
    #: Days after the last instance (or the failure of its job) of a series the node did not process
    #: (no rule matched, or its job failed) before its instances are deleted.
    not_processed_days: float = Field(default=30.0, gt=0)
    #: How often the retention sweep runs, seconds.
    sweep_interval_s: float = Field(default=3600.0, gt=0)


class JournalSettings(_Strict):
    """``[journal]``: where the journal is. ``sqlite`` (default): ``journal.sqlite3`` in ``[node] data_dir``, for the
    processes of one machine. ``postgresql``: one database shared by every process (receivers, workers,
    dispatchers) on any machine given the same ``[journal]``; the schema is created by the first process that
    opens an empty database."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    #: libpq conninfo or URL of the database (``host=db port=5432 dbname=dicom_node user=node``,
    #: ``postgresql://node@db/dicom_node``), without a password: give it in ``password_file`` or libpq's
    #: environment (``PGPASSWORD``, ``PGPASSFILE``).
    dsn: str | None = None
    #: A file whose first line is the database password, read when a process opens the journal (never logged).
    password_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> JournalSettings:
        if self.backend == "postgresql" and not (self.dsn or "").strip():
            raise ValueError('dsn: backend = "postgresql" needs a dsn (libpq conninfo or postgresql:// URL)')
        if self.backend == "sqlite" and (self.dsn or self.password_file):
            raise ValueError('dsn: only for backend = "postgresql" (the sqlite journal is in [node] data_dir)')
        if self.dsn and re.search(r"(?i)(\bpassword\s*=|^postgres(ql)?://[^/@]*:[^/@]*@)", self.dsn):
            raise ValueError("dsn: holds a password; put it in password_file (or PGPASSWORD) instead, the "
                             "configuration is not a place for secrets")
        return self


class DispatchSettings(_Strict):
    """``[dispatch]``: outbox retry policy (applied by ``dispatch.RetryPolicy``)."""

    #: An item is failed for good once its first failed try is this long ago (default: a day), so a
    #: long outage of a destination is outlasted.
    retry_for_s: float = Field(default=86400.0, gt=0)
    #: Also fail for good after this many tries (None: only ``retry_for_s`` limits the retries).
    max_tries: int | None = Field(default=None, ge=1)
    #: Wait before the 2nd try; each later wait doubles, up to ``backoff_max_s``.
    backoff_initial_s: float = Field(default=10.0, gt=0)
    backoff_max_s: float = Field(default=900.0, gt=0)
    #: How often the outbox is scanned for work that is due.
    scan_interval_s: float = Field(default=2.0, gt=0)
    max_pdu_size: int = Field(default=0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)
    #: A dispatcher claims the items it sends (several receivers and dispatchers may share the outbox) for this
    #: long, renewed every third of it while it sends; a dispatcher that died leaves its items to the others
    #: after it. Keep it well above any pause of a process.
    lease_s: float = Field(default=120.0, ge=10.0)
    #: Items of one destination claimed (and sent over one association per ``max_associations``) at a time.
    claim_batch: int = Field(default=1000, ge=1)
    #: ``dicom-node status`` needs attention (exit 1) when a destination's pending items have been failing their
    #: tries for this long (a PACS down): the items are retried for ``retry_for_s``, but someone should know now.
    alert_after_s: float = Field(default=900.0, gt=0)


#: FLAIR (Siemens: "dark-fluid", "da-fl"), but not GE's "T1 FLAIR" (a T1-weighted 2D sequence).
FLAIR_DESCRIPTION = r"^(?!.*t1).*(flair|dark[-_ ]?fluid|da[-_]fl)"
#: BodyPartExamined of a head, in the terms scanners write (DICOM's HEAD and BRAIN, some sites' own words), or
#: none at all (many scanners leave it empty): the default rules leave a spine, a knee or a prostate alone.
HEAD_BODY_PARTS = r"^$|head|brain|skull|neuro|cran|cereb|kopf|sch(a|ae|\u00e4)del|t(e|\u00ea)te|cerveau|cabeza"
#: What no default rule takes: a scanner's second, unfiltered copy of a series (Siemens appends "_ND" to the
#: description of the copy it stores without distortion correction beside the corrected one).
UNFILTERED_COPY = r"_nd$"


#: the model for every input kind; the default rules use it where no per-kind model fits (docs/training.md)
GENERAL_MODEL = "synth-t1"


def default_rules() -> list[Rule]:
    """The rules used when the config file has no ``[[rules]]``.

    Order matters: reformats and the node's own objects never reach them (loop guard), the scout
    rule is the most specific, and the real 3D T1 rule comes before the 2D T1 one. Each kind the
    bundled models were fine-tuned for goes to its own model (on the held-out maps it beat the general
    model on its kind); 3D FLAIR goes to the general model. The real 3D T1 is measured by the segmenter
    (the general model only when ``[inference] segmenter`` is empty).
    """
    head = {"body_part_examined": HEAD_BODY_PARTS, "image_type": ["ORIGINAL"]}
    return [
        Rule(name="aahead-scout", series_description=r"^aa_?head_?scout", model="synth-t1-aahead-scout",
             output_name="sT1AAH", mr_acquisition_type="3D", series_description_excludes=UNFILTERED_COPY, **head),
        Rule(name="flair-3d", series_description=FLAIR_DESCRIPTION, output_name="sT13DFLAIR",
             model=GENERAL_MODEL,  # the FLAIR model learnt 2D slices of 3-7 mm, not 1 mm 3D
             mr_acquisition_type="3D", series_description_excludes=UNFILTERED_COPY, **head),
        Rule(name="flair-2d", series_description=FLAIR_DESCRIPTION, model="synth-t1-flair", output_name="sT12DFLAIR",
             mr_acquisition_type="2D", series_description_excludes=UNFILTERED_COPY, **head),
        # a 2D turbo spin echo T2; not STIR (tirm, stir), T2* (fl2d, hemo, swi, "*") or a 3D slab (ciss, space)
        # (no MRAcquisitionType matcher: it is Type 2, and older or anonymised headers leave it empty)
        Rule(name="coronal-t2", series_description=r"(t2.*(cor|kor))|((cor|kor).*t2)", model="synth-t1-cor-t2",
             output_name="sT1CorT2",
             series_description_excludes=UNFILTERED_COPY + r"|tirm|stir|fl2d|hemo|swi|\*|ciss|spc|space|cube",
             **head),
        # MP2RAGE: its inversion images (INV1, INV2) are not T1-weighted images; its UNI image is DERIVED
        Rule(name="real-3d-t1", action="volumetry", output_name="rT1",
             series_description=r"mprage|mp-rage|mp2rage|bravo|fspgr|t1.*(3d|tfl|spgr|vibe)|(3d|tfl|spgr).*t1",
             series_description_excludes=UNFILTERED_COPY + r"|inv[12]",
             model=GENERAL_MODEL,  # measures the real T1 only when [inference] segmenter is empty
             mr_acquisition_type="3D", slice_thickness_max=1.5, **head),
        Rule(name="t1-2d", series_description=r"t1", model="synth-t1-t1-2d", output_name="sT12DT1",
             mr_acquisition_type="2D", slice_thickness_min=2.0, slice_thickness_max=8.0,
             series_description_excludes=UNFILTERED_COPY, **head),
    ]


class NodeConfig(_Strict):
    """The whole configuration file."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    peers: list[Peer] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=default_rules)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    volumetry: VolumetrySettings = Field(default_factory=VolumetrySettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    notifications: list[Notification] = Field(default_factory=list)
    http: HTTPSettings = Field(default_factory=HTTPSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        for i, peer in enumerate(self.peers):
            if (peer.tls or peer.tls_common_name) and self.tls.port is None:
                raise ValueError(f"peers[{i}].tls: the peer must use TLS, but [tls] has no port")
            if peer.tls_common_name and self.tls.ca_file is None:
                raise ValueError(f"peers[{i}].tls_common_name: needs [tls] ca_file to verify client certificates")
        for i, dest in enumerate(self.destinations):
            if dest.tls_client_cert and self.tls.cert_file is None:
                raise ValueError(f"destinations[{i}].tls_client_cert: [tls] has no cert_file")
            if dest.tls_client_cert and not (dest.tls or (dest.url or "").startswith("https://")):
                raise ValueError(f"destinations[{i}].tls_client_cert: needs tls = true (or an https url)")
        if self.tls.port is not None and self.tls.port == self.node.port:
            raise ValueError("tls.port: the TLS port and [node] port must differ")
        if self.http.port and self.http.port in (self.node.port, self.tls.port):
            raise ValueError("http.port: the HTTP port and the DICOM ports must differ")
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"destinations[{i}].name: duplicate destination name {name!r}")
        if self.limits.max_connections < self.node.max_associations:
            raise ValueError("limits.max_connections is smaller than node.max_associations")
        rule_names = [r.name for r in self.rules]
        for i, rule in enumerate(self.rules):
            if rule.name in rule_names[:i]:
                raise ValueError(f"rules[{i}].name: duplicate rule name {rule.name!r}")
            if rule.action == "volumetry" and not rule.model and not self.inference.segmenter:
                raise ValueError(f"rules[{i}].model: a volumetry rule needs a model when [inference] segmenter "
                                 "is empty")
            for dest in rule.destinations or []:
                if dest not in names:
                    raise ValueError(
                        f"rules[{i}].destinations: unknown destination {dest!r} "
                        f"(defined: {', '.join(names) or 'none'})"
                    )
        return self

    def models_for(self, rule: Rule) -> list[str]:
        """The model ids a rule needs: its synthesis model and, for volumetry, the segmenter (or, without a
        segmenter, the rule's own model)."""
        needed = [rule.model] if rule.action == "synthesize" and rule.model else []
        if rule.volumetry:
            segmenter = self.inference.segmenter or rule.model
            if segmenter and segmenter not in needed:
                needed.append(segmenter)
        return needed

    def audit_path(self) -> Path | None:
        """The audit trail's file (None when ``[audit] enabled`` is false)."""
        if not self.audit.enabled:
            return None
        return self.audit.path if self.audit.path.is_absolute() else self.node.data_dir / self.audit.path

    def destinations_for(self, rule: Rule) -> list[Destination]:
        if rule.destinations is None:
            return list(self.destinations)
        return [d for d in self.destinations if d.name in rule.destinations]

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)


class ConfigError(ValueError):
    """The configuration file cannot be used; the message names the file and the bad fields."""


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid configuration ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_config(text: str, source: str = "<config>", base: Path | None = None) -> NodeConfig:
    """Validate ``text``; ``base``: the folder relative paths are taken from (the file's; :func:`anchored`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = NodeConfig.model_validate(data, context={"base": base})
        return config if base is None else anchored(config, base)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


_M = TypeVar("_M", bound=BaseModel)

#: Where the node looks for its configuration when no ``--config`` is given and ``DICOM_NODE_CONFIG`` is unset.
DEFAULT_CONFIG_PATH = Path("/etc/dicom-node/node.toml")
#: Environment variable naming the configuration file (a ``--config`` option wins over it).
CONFIG_ENV = "DICOM_NODE_CONFIG"


def config_path(option: str | None, environ: Mapping[str, str] = os.environ,
                default: Path = DEFAULT_CONFIG_PATH) -> Path | None:
    """The configuration file to read: ``--config``, else ``$DICOM_NODE_CONFIG``, else ``default`` when it
    exists; ``None`` (the embedded defaults) when none applies. A file named by the option or the variable must
    exist (:func:`load_config` says so); only the default location may be absent."""
    if option:
        return Path(option)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return default if default.is_file() else None


def load_config(path: Path | None) -> NodeConfig:
    """Read and validate ``path``; ``None`` gives the embedded defaults."""
    if path is None:
        return NodeConfig()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read configuration: not UTF-8 text (byte {exc.start})") from None
    # the folder the file is named in (not a symlink's target: a ConfigMap's files are links into a hidden folder)
    return parse_config(text, str(path), Path(path).absolute().parent)


def anchored(model: _M, base: Path) -> _M:
    """``model`` with its relative paths taken from ``base`` (the configuration file's folder), not from the folder
    a command happens to run in: `config check` run in /etc/dicom-node and the unit (run in /) read the same files.
    ``[audit] path`` stays relative: it is under ``[node] data_dir``."""
    updates: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute() and not (isinstance(model, AuditSettings)
                                                                      and name == "path"):
            updates[name] = base / value
        elif isinstance(value, BaseModel):
            inner = anchored(value, base)
            if inner is not value:
                updates[name] = inner
        elif isinstance(value, list) and any(isinstance(item, BaseModel) for item in value):
            items = [anchored(item, base) if isinstance(item, BaseModel) else item for item in value]
            if any(a is not b for a, b in zip(items, value, strict=True)):
                updates[name] = items
    return model.model_copy(update=updates) if updates else model
