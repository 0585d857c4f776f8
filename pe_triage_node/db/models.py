"""SQLAlchemy 2 models: what the node received, what it rejected, and its job queue.

Schema changes go through Alembic migrations in the top-level ``db/`` folder.
The database holds PHI (patient identifiers for the worklist); logs never do.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)
AE = String(16)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """``DateTime(timezone=True)`` that stores UTC and always returns aware UTC datetimes.

    SQLite keeps no zone: without this, an aware non-UTC value would be stored as
    its local wall time and every value would come back naive. Naive values bound
    to a query are taken as UTC. The DDL is plain ``DateTime(timezone=True)``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: object) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime()}


class SeriesState(str, enum.Enum):
    receiving = "receiving"  # instances still arriving
    complete = "complete"  # assembled, awaiting selection
    selected = "selected"  # the study's CTPA series; an inference job exists
    rejected = "rejected"  # not analysed; see rejections
    ignored = "ignored"  # not a CT image series (dose report, SR, scout SOP class...)


class JobState(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"  # failed this attempt; re-queued unless attempts exhausted
    dead = "dead"  # dead-lettered with last_error


class JobKind(str, enum.Enum):
    infer = "infer"
    export = "export"


class Association(Base):
    """One DICOM association accepted by the receiver (for assembly and the ops page)."""

    __tablename__ = "associations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4 hex
    calling_ae: Mapped[str] = mapped_column(AE)
    called_ae: Mapped[str] = mapped_column(AE)
    peer_address: Mapped[str] = mapped_column(String(64))
    receiver_pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    released_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)  # released/aborted
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_age: Mapped[str | None] = mapped_column(String(4))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    referring_physician: Mapped[str | None] = mapped_column(String(324))
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    protocol_name: Mapped[str | None] = mapped_column(String(64))
    image_type: Mapped[str | None] = mapped_column(String(128))
    convolution_kernel: Mapped[str | None] = mapped_column(String(64))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    contrast_bolus_agent: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[SeriesState] = mapped_column(
        Enum(SeriesState, native_enum=False, length=16), default=SeriesState.receiving, index=True
    )
    state_reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    last_association_id: Mapped[str | None] = mapped_column(String(36))
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    completion_reason: Mapped[str | None] = mapped_column(String(64))
    completed_instances: Mapped[int | None] = mapped_column(Integer, default=None)  # late instances re-open it
    # Bumped whenever an instance arrives after completion: the series is re-assembled.
    generation: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    spool_path: Mapped[str] = mapped_column(String(512))  # relative to the spool root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    image_position_patient: Mapped[str | None] = mapped_column(String(96))  # "x\\y\\z"
    image_orientation_patient: Mapped[str | None] = mapped_column(String(192))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    association_id: Mapped[str | None] = mapped_column(String(36), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Rejection(Base):
    """Anything the node did not analyse, with a reason a person can read."""

    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[str] = mapped_column(String(32))  # receive / assembly / selection / inference
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    status: Mapped[int | None] = mapped_column(Integer)  # DICOM status returned, if any
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class Job(Base):
    """The SQL job queue (DESIGN.md): claimed with SKIP LOCKED / a conditional update."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(Enum(JobKind, native_enum=False, length=16))
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16), default=JobState.queued
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher first
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    payload: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    dedupe_key: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    not_before: Mapped[dt.datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")

    __table_args__ = (
        Index("ix_jobs_claim", "kind", "state", "priority", "not_before"),
        # One active job per dedupe key (queued or running).
        Index(
            "uq_jobs_active_dedupe",
            "dedupe_key",
            unique=True,
            sqlite_where=text("state IN ('queued','running')"),
            postgresql_where=text("state IN ('queued','running')"),
        ),
    )


class JobEvent(Base):
    """Append-only history of a job."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())
    event: Mapped[str] = mapped_column(String(32))  # queued/claimed/heartbeat-lost/succeeded/...
    worker: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="events")


# -- priority rules and triage results (rules room; migration 0002) ------------


class RuleSetRecord(Base):
    """One version of the priority rules (``config/rules.toml`` syntax), append-only.

    Every activation or rollback adds a row that records when, by whom, why,
    the new text and the text it replaced; exactly one row is active (a partial
    unique index allows at most one; with no row, the node uses the rules file).
    """

    __tablename__ = "rule_sets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    author: Mapped[str] = mapped_column(String(128))
    comment: Mapped[str] = mapped_column(Text)
    toml_text: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))  # of toml_text (UTF-8)
    active: Mapped[bool] = mapped_column(default=False)
    action: Mapped[str] = mapped_column(String(16), default="activate")  # activate / rollback
    # The rules in force before this change: a row, or (None) the rules file whose text is kept below.
    previous_id: Mapped[int | None] = mapped_column(ForeignKey("rule_sets.id"), default=None)
    previous_toml_text: Mapped[str | None] = mapped_column(Text, default=None)
    previous_source: Mapped[str | None] = mapped_column(String(512), default=None)  # "rule set 3", a file path
    restored_from_id: Mapped[int | None] = mapped_column(ForeignKey("rule_sets.id"), default=None)

    __table_args__ = (
        Index(
            "uq_rule_sets_active",
            "active",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )


class TriageResult(Base):
    """A study's inference result and triage decision, as the worker stored it.

    Labels, probabilities and the DICOM attributes the rules read are kept as
    JSON text so that ``pe-triage rules test`` can replay new rules over them.
    """

    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    generation: Mapped[int] = mapped_column(Integer, default=0)  # series generation analysed
    model_version: Mapped[str] = mapped_column(String(64))
    labels: Mapped[str] = mapped_column(Text, default="{}")  # JSON {label: bool}, consistent
    probabilities: Mapped[str] = mapped_column(Text, default="{}")  # JSON {label: float}
    attributes: Mapped[str] = mapped_column(Text, default="{}")  # JSON {DICOM keyword: str}
    priority: Mapped[str] = mapped_column(String(16))  # STAT / URGENT / ROUTINE
    rule_name: Mapped[str | None] = mapped_column(String(200), default=None)  # None: default priority
    rule_set_id: Mapped[int | None] = mapped_column(
        ForeignKey("rule_sets.id", ondelete="SET NULL"), default=None
    )  # None: the rules file
    flags: Mapped[str] = mapped_column(Text, default="[]")  # JSON list, e.g. ["review"]
    explanation: Mapped[str | None] = mapped_column(Text, default=None)
    result_json: Mapped[str] = mapped_column(Text, default="{}")  # the full serialised StudyResult
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


# -- web console: users, sessions, audit log (web room; migration 0003) ----------


class WebUser(Base):
    """A person who may sign in to the web console; the password is stored as an argon2 hash."""

    __tablename__ = "web_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="viewer")  # viewer / admin
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_sign_in_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class WebSession(Base):
    """A signed-in browser: the cookie holds a random token, the table only its sha256."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("web_users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)


class AuditEvent(Base):
    """Append-only log of sign-ins and changes made through the console or ``pe-triage users``."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    username: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))  # sign-in / sign-in-failed / rules-activate / ...
    target: Mapped[str | None] = mapped_column(String(200))  # "rule set 4", "job 17" (no PHI)
    detail: Mapped[str | None] = mapped_column(Text)
    remote_addr: Mapped[str | None] = mapped_column(String(64))
