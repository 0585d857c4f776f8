"""HTTP tests of the web console, every page and action, refusals included (SQLite + PostgreSQL)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.models import AuditEvent, Job, JobKind, JobState, RuleSetRecord, TriageResult, WebSession
from pe_triage_node.rules.store import active_record, packaged_rules_text
from pe_triage_node.web import rules_preview
from pe_triage_node.web.app import create_app

try:
    from tests import web_seed
except ImportError:  # pragma: no cover - run from inside tests/
    import web_seed  # type: ignore[no-redef]

UID_PREFIX = "1.2.826.0.1.3680043"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass
class Console:
    client: TestClient
    engine: Engine
    cfg: NodeConfig
    ids: web_seed.Seeded

    def csrf(self, path: str = "/") -> str:
        r = self.client.get(path)
        assert r.status_code == 200, r.text
        m = CSRF_RE.search(r.text)
        assert m, "no CSRF token on the page"
        return m.group(1)

    def sign_in(self, who: tuple[str, str]) -> None:
        r = self.client.get("/signin")
        token = CSRF_RE.search(r.text).group(1)  # type: ignore[union-attr]
        r = self.client.post("/signin", data={"username": who[0], "password": who[1], "csrf_token": token, "next": "/"},
                             follow_redirects=False)
        assert r.status_code == 303, r.text
        set_cookie = r.headers.get("set-cookie", "")
        assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie.replace("Strict", "strict")

    def audit(self) -> list[tuple[str | None, str, str | None]]:
        with Session(self.engine) as s:
            return [(a.username, a.action, a.target) for a in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def make_cfg(db_url: str, tmp_path: Path, with_manifest: bool = True) -> NodeConfig:
    data: dict[str, object] = {"node": {"var_dir": str(tmp_path / "var")}, "database": {"url": db_url}}
    if with_manifest:
        data["inference"] = {"weights_manifest": str(web_seed.manifest(tmp_path / "model"))}
    else:  # a manifest path that does not exist (the shipped demo weights would be found otherwise)
        data["inference"] = {"weights_manifest": str(tmp_path / "missing" / "manifest.json")}
    cfg = NodeConfig(**data)  # type: ignore[arg-type]
    cfg.spool_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def console(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Console]:
    cfg = make_cfg(db_url, tmp_path)
    ids = web_seed.seed(engine, cfg.node.var_dir)
    with TestClient(create_app(cfg, engine)) as client:
        yield Console(client, engine, cfg, ids)


def _order(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'data-study="(\d+)"', html)]


# -- access -------------------------------------------------------------------


def test_pages_need_sign_in_but_probes_do_not(console: Console) -> None:
    c = console.client
    for path in ("/", "/rules", "/ops", f"/study/{console.ids.stat_id}", f"/study/{console.ids.stat_id}/image/x.png"):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/signin?next="), path
    assert c.get("/worklist/rows").status_code == 401
    assert c.post("/rules/save", data={"toml_text": "x"}).status_code == 401
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 200
    assert c.get("/metrics").status_code == 200
    assert c.get("/static/console.css").status_code == 200
    r = c.get("/signin")
    assert r.status_code == 200 and "NOT FOR DIAGNOSTIC USE" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_wrong_password_is_refused_and_audited(console: Console) -> None:
    c = console.client
    token = CSRF_RE.search(c.get("/signin").text).group(1)  # type: ignore[union-attr]
    r = c.post("/signin", data={"username": "alice", "password": "wrong password", "csrf_token": token})
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    token = CSRF_RE.search(r.text).group(1)  # type: ignore[union-attr]  # a fresh form each time
    r = c.post("/signin", data={"username": "nobody", "password": "whatever12", "csrf_token": token})
    assert r.status_code == 401
    assert ("alice", "sign-in-failed", None) in console.audit()
    assert c.get("/", follow_redirects=False).status_code == 303


def test_sign_in_form_without_its_token_is_refused(console: Console) -> None:
    r = console.client.post("/signin", data={"username": web_seed.ADMIN[0], "password": web_seed.ADMIN[1]})
    assert r.status_code == 403
    assert console.client.get("/", follow_redirects=False).status_code == 303


def test_sign_in_then_out(console: Console) -> None:
    console.sign_in(web_seed.ADMIN)
    assert ("alice", "sign-in", None) in console.audit()
    token = console.csrf("/")
    r = console.client.post("/signout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    with Session(console.engine) as s:
        assert s.scalar(select(func.count()).select_from(WebSession)) == 0
    assert console.client.get("/", follow_redirects=False).status_code == 303


def test_next_is_local_only(console: Console) -> None:
    c = console.client
    token = CSRF_RE.search(c.get("/signin?next=//evil.example/").text).group(1)  # type: ignore[union-attr]
    r = c.post("/signin", data={"username": "alice", "password": web_seed.ADMIN[1], "csrf_token": token,
                                "next": "//evil.example/"}, follow_redirects=False)
    assert r.headers["location"] == "/"


def test_expired_session_signs_out(console: Console) -> None:
    console.sign_in(web_seed.VIEWER)
    import datetime as dt

    with Session(console.engine) as s, s.begin():
        for ws in s.scalars(select(WebSession)):
            ws.last_seen_at = ws.last_seen_at - dt.timedelta(minutes=console.cfg.web.session_idle_minutes + 1)
    assert console.client.get("/", follow_redirects=False).status_code == 303


# -- worklist -----------------------------------------------------------------


def test_worklist_stat_first_then_arrival(console: Console) -> None:
    console.sign_in(web_seed.VIEWER)
    r = console.client.get("/")
    assert r.status_code == 200
    ids = console.ids
    assert _order(r.text) == [ids.stat_id, ids.urgent_id, ids.queued_id, ids.routine_id, ids.rejected_id,
                              ids.failed_id, ids.refused_id]
    html = r.text
    assert "DOE, JANE" in html and "P0003" in html and "A1003" in html  # identifiers for signed-in users
    assert "central PE, RV/LV&gt;=1" in html  # the headline of export.findings, as the SR and SCs say it
    assert "export failed" in html and "running" in html and "rejected" in html and "no PE" in html
    assert "not analysed" in html and "no CTPA series in the study" in html  # why the study was not analysed
    assert UID_PREFIX not in html
    assert "NOT FOR DIAGNOSTIC USE" in html
    assert 'src="/static/worklist.js"' in html


@pytest.mark.parametrize(
    ("query", "expect"),
    [
        ("priority=STAT", ["stat_id"]),
        ("priority=ROUTINE", ["routine_id"]),
        ("status=running", ["queued_id"]),
        ("status=rejected", ["rejected_id", "refused_id"]),
        ("status=failed", ["failed_id"]),
        ("status=done", ["urgent_id", "routine_id"]),
        ("status=export+failed", ["stat_id"]),
        ("date=2001-01-01", []),
        ("received=24h&priority=URGENT", ["urgent_id"]),
    ],
)
def test_worklist_filters_and_fragment(console: Console, query: str, expect: list[str]) -> None:
    console.sign_in(web_seed.VIEWER)
    want = [getattr(console.ids, name) for name in expect]
    assert _order(console.client.get(f"/?{query}").text) == want
    fragment = console.client.get(f"/worklist/rows?{query}")
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert _order(fragment.text) == want


def _row(html: str, study_id: int) -> str:
    m = re.search(rf'<tr [^>]*data-study="{study_id}">(.*?)</tr>', html, re.S)
    assert m, f"no row for study {study_id}"
    return m.group(1)


def test_failed_and_refused_studies_say_why(console: Console) -> None:
    """A dead analysis is "failed" with its error; a series the worker refused is "not analysed" with the reason."""
    console.sign_in(web_seed.VIEWER)
    html = console.client.get("/").text
    failed = _row(html, console.ids.failed_id)
    assert "analysis failed" in failed and web_seed.FAILED_REASON in failed and "status-failed" in failed
    assert "in analysis" not in failed
    refused = _row(html, console.ids.refused_id)
    assert "not analysed" in refused and web_seed.REFUSED_REASON in refused and "status-rejected" in refused
    assert "in analysis" not in refused and "status-failed" not in refused
    rejected = _row(html, console.ids.rejected_id)
    assert "not analysed" in rejected and "no CTPA series in the study" in rejected
    assert "in analysis" in _row(html, console.ids.queued_id)


def test_a_failed_attempt_waiting_for_its_retry_says_so(console: Console) -> None:
    with Session(console.engine) as s, s.begin():
        job = s.scalars(select(Job).where(Job.kind == JobKind.infer, Job.state == JobState.dead,
                                          Job.last_error == web_seed.FAILED_REASON)).one()
        job.state, job.attempts = JobState.failed, 1
    console.sign_in(web_seed.VIEWER)
    row = _row(console.client.get("/").text, console.ids.failed_id)
    assert "in analysis" in row and "status-queued" in row
    assert f"attempt 1 failed, will retry: {web_seed.FAILED_REASON}" in row


# -- study page ---------------------------------------------------------------


def test_study_page_shows_labels_attention_images_series_exports_history(console: Console) -> None:
    console.sign_in(web_seed.VIEWER)
    ids = console.ids
    r = console.client.get(f"/study/{ids.stat_id}")
    assert r.status_code == 200
    html = r.text
    for name in ("Central PE", "Left-sided PE", "Right-sided PE", "RV/LV ratio &gt;= 1", "Chronic PE",
                 "Negative for PE", "Indeterminate (quality)", "PE present"):
        assert name in html, name
    assert "central PE, RV/LV&gt;=1" in html
    assert "0.88" in html and "0.05" in html  # central_pe probability and its threshold
    assert html.count('class="strip"') >= 9  # attention strip per label
    assert f'src="/study/{ids.stat_id}/image/{ids.image_name}"' in html
    assert "Topogram" in html and "scout" in html  # rejected series with its reason
    assert "PACS_MAIN" in html and "ARCHIVE" in html and "association rejected" in html
    assert "infer job" in html and "claimed" in html
    assert "Resend" not in html  # viewer
    assert UID_PREFIX not in html
    img = console.client.get(f"/study/{ids.stat_id}/image/{ids.image_name}")
    assert img.status_code == 200 and img.content.startswith(b"\x89PNG")
    assert console.client.get(f"/study/{ids.stat_id}/image/missing.png").status_code == 404
    assert console.client.get(f"/study/{ids.stat_id}/image/..%2F..%2Fnode.db").status_code == 404
    assert console.client.get(f"/study/{ids.stat_id}/image/.hidden.png").status_code == 404
    assert console.client.get("/study/999999").status_code == 404
    r = console.client.get(f"/study/{ids.queued_id}")
    assert r.status_code == 200 and "Not analysed yet" in r.text


def test_resend_refusals_and_requeue(console: Console) -> None:
    ids = console.ids
    url = f"/study/{ids.stat_id}/exports/{ids.export_dead_job}/resend"

    def state(job_id: int) -> JobState:
        with Session(console.engine) as s:
            return s.get(Job, job_id).state  # type: ignore[union-attr]

    console.sign_in(web_seed.VIEWER)
    token = console.csrf(f"/study/{ids.stat_id}")
    assert console.client.post(url, data={"csrf_token": token}).status_code == 403
    assert state(ids.export_dead_job) == JobState.dead

    console.sign_in(web_seed.ADMIN)
    assert console.client.post(url, data={}).status_code == 403  # no CSRF token
    assert console.client.post(url, data={"csrf_token": "forged"}).status_code == 403
    assert state(ids.export_dead_job) == JobState.dead
    page = console.client.get(f"/study/{ids.stat_id}")
    assert "Resend" in page.text
    token = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
    r = console.client.post(url, data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and "msg=requeued" in r.headers["location"]
    assert state(ids.export_dead_job) == JobState.queued
    # a delivered export is sent again as a new job
    r = console.client.post(f"/study/{ids.stat_id}/exports/{ids.export_ok_job}/resend", data={"csrf_token": token},
                            follow_redirects=False)
    assert "msg=resent" in r.headers["location"]
    with Session(console.engine) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == JobKind.export)) == 3
    # a job of another study is not found through this one
    r = console.client.post(f"/study/{ids.routine_id}/exports/{ids.export_ok_job}/resend", data={"csrf_token": token})
    assert r.status_code == 404
    actions = [a[1] for a in console.audit()]
    assert actions.count("export-resend") == 2


# -- rules --------------------------------------------------------------------


def _escalated_rules() -> str:
    text = packaged_rules_text()
    edited = text.replace('name = "Any PE"\npriority = "URGENT"', 'name = "Any PE"\npriority = "STAT"')
    assert edited != text
    return edited


def _rule_sets(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(RuleSetRecord)) or 0)


def _with_first_rule(pattern: str) -> str:
    """The shipped rules with a first rule matching StudyDescription against ``pattern``."""
    text = packaged_rules_text()
    rule = f"""[[rules]]\nname = "ED"\npriority = "STAT"\nwhen = {{ attribute = "StudyDescription", matches = '{pattern}' }}\n\n"""
    at = text.index("[[rules]]")
    return text[:at] + rule + text[at:]


# Nested repetition: on a crafted value every match runs into the 0.1 s limit of pe_triage_node.patterns.
RUNAWAY = "(a|aa)+$"


def test_a_runaway_pattern_is_stopped_and_nothing_changes(console: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each match is cut at its own limit and the replay at its deadline: the preview answers, refuses, saves nothing."""
    monkeypatch.setattr(rules_preview, "TIME_LIMIT_S", 0.05)
    with Session(console.engine) as s, s.begin():  # stored results whose StudyDescription a sender crafted
        for row in s.scalars(select(TriageResult)):
            row.attributes = json.dumps({**json.loads(row.attributes or "{}"), "StudyDescription": "a" * 60 + "b"})
    console.sign_in(web_seed.ADMIN)
    token = console.csrf("/rules")
    r = console.client.post("/rules/preview", data={"csrf_token": token, "toml_text": _with_first_rule(RUNAWAY)})
    assert r.status_code == 422 and "took longer than 0.05 s and was stopped" in r.text
    assert console.client.get("/healthz").status_code == 200
    r = console.client.post("/rules/save", data={"csrf_token": token, "toml_text": _with_first_rule(RUNAWAY),
                                                 "comment": "ED first"})
    assert r.status_code == 422 and "was stopped" in r.text
    assert _rule_sets(console.engine) == 0


def test_rules_preview_needs_csrf(console: Console) -> None:
    console.sign_in(web_seed.ADMIN)
    r = console.client.post("/rules/preview", data={"toml_text": _escalated_rules()})
    assert r.status_code == 403


def test_bad_rules_show_the_error_in_place_and_change_nothing(console: Console) -> None:
    console.sign_in(web_seed.ADMIN)
    token = console.csrf("/rules")
    bad = _escalated_rules().replace('priority = "STAT"\ncomment = "Central', 'priority = "SOON"\ncomment = "Central')
    for path in ("/rules/save", "/rules/preview"):
        r = console.client.post(path, data={"csrf_token": token, "toml_text": bad, "comment": "try"})
        assert r.status_code == 422
        assert "These rules are not valid; nothing was changed." in r.text
        assert 'rule 1 &#34;Central PE&#34;' in r.text or "rule 1 &quot;Central PE&quot;" in r.text
        assert "SOON" in r.text  # the editor keeps the text
    r = console.client.post("/rules/save", data={"csrf_token": token, "toml_text": "rules = [", "comment": "try"})
    assert r.status_code == 422 and "not valid TOML" in r.text
    r = console.client.post("/rules/save", data={"csrf_token": token, "toml_text": _escalated_rules(), "comment": "  "})
    assert r.status_code == 422 and "required" in r.text
    assert console.client.post("/rules/save", data={"toml_text": _escalated_rules(), "comment": "x"}).status_code == 403
    assert _rule_sets(console.engine) == 0


def test_admin_saves_sees_history_and_rolls_back(console: Console) -> None:
    console.sign_in(web_seed.ADMIN)
    token = console.csrf("/rules")
    crlf = _escalated_rules().replace("\n", "\r\n")  # what a browser's textarea submits
    r = console.client.post("/rules/save", data={"csrf_token": token, "toml_text": crlf,
                                                 "comment": "escalate every PE"}, follow_redirects=False)
    assert r.status_code == 303
    with Session(console.engine) as s:
        row = active_record(s)
        assert row is not None and row.author == "alice" and row.comment == "escalate every PE"
        assert row.toml_text == _escalated_rules()  # line breaks normalised: the diff shows only the edit
        first_id = row.id
    page = console.client.get(r.headers["location"])
    assert f"Rule set {first_id} is now in force." in page.text
    assert "escalate every PE" in page.text and '+priority = &#34;STAT&#34;' in page.text
    r = console.client.post("/rules/save", data={"csrf_token": token, "toml_text": packaged_rules_text(),
                                                 "comment": "back to defaults"}, follow_redirects=False)
    assert r.status_code == 303
    r = console.client.post(f"/rules/rollback/{first_id}", data={"csrf_token": token, "comment": ""})
    assert r.status_code == 422
    r = console.client.post(f"/rules/rollback/{first_id}", data={"csrf_token": token, "comment": "the escalation was right"},
                            follow_redirects=False)
    assert r.status_code == 303
    with Session(console.engine) as s:
        row = active_record(s)
        assert row is not None and row.action == "rollback" and row.restored_from_id == first_id
    actions = [a[1] for a in console.audit()]
    assert actions.count("rules-activate") == 2 and actions.count("rules-rollback") == 1
    console.sign_in(web_seed.VIEWER)
    token = console.csrf("/rules")
    assert console.client.post(f"/rules/rollback/{first_id}", data={"csrf_token": token, "comment": "x"}).status_code == 403


# -- operations, health, metrics ----------------------------------------------


def test_ops_page(console: Console) -> None:
    console.sign_in(web_seed.VIEWER)
    r = console.client.get("/ops")
    assert r.status_code == 200
    for text in ("worker@gpu0", "CT_SCANNER_1", "2026.1-test", "association rejected", "no CTPA series", "Free"):
        assert text in r.text, text
    assert "Audit log" not in r.text
    console.sign_in(web_seed.ADMIN)
    r = console.client.get("/ops")
    assert "Audit log" in r.text and "sign-in" in r.text


def test_ops_page_lists_the_destinations_with_their_jobs_and_no_credentials(engine: Engine, db_url: str, tmp_path: Path) -> None:
    cfg = make_cfg(db_url, tmp_path)
    cfg.export = cfg.export.model_validate({"destinations": [
        {"name": "PACS_MAIN", "ae_title": "PACS", "host": "pacs.example", "port": 104},
        {"name": "ris", "kind": "hl7", "host": "ris.example", "port": 2575, "min_priority": "URGENT"},
        {"name": "ehr", "kind": "fhir", "url": "https://user:pw-123@ehr.example:8443/fhir", "bearer_token": "tok-456"},
    ]})
    ids = web_seed.seed(engine, cfg.node.var_dir)
    with TestClient(create_app(cfg, engine)) as client:
        Console(client, engine, cfg, ids).sign_in(web_seed.VIEWER)
        html = client.get("/ops").text
    section = html[html.index("Export destinations"):html.index("Workers")]
    for text in ("PACS@pacs.example:104", "MLLP ris.example:2575", "https://ehr.example:8443/fhir", "URGENT", "hl7", "fhir"):
        assert text in section, text
    assert "pw-123" not in html and "tok-456" not in html
    pacs_row = re.search(r"<tr><td>PACS_MAIN</td>.*?</tr>", section)
    assert pacs_row and re.findall(r'class="num[^"]*">(\d+)<', pacs_row.group(0)) == ["0", "0", "1", "0"]  # the seeded dead job


def test_readyz_reports_each_check(engine: Engine, db_url: str, tmp_path: Path) -> None:
    cfg = make_cfg(db_url, tmp_path, with_manifest=False)
    with TestClient(create_app(cfg, engine)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["checks"]["database"]["ok"] and body["checks"]["spool"]["ok"]
        assert not body["checks"]["model"]["ok"] and "manifest" in body["checks"]["model"]["detail"]
    cfg = make_cfg(db_url, tmp_path)
    with TestClient(create_app(cfg, engine)) as client:
        body = client.get("/readyz").json()
        assert body["status"] == "ready" and body["checks"]["model"]["model_version"] == "2026.1-test"


def test_metrics_parse(console: Console) -> None:
    r = console.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    jobs = {(s.labels["kind"], s.labels["state"]): s.value for s in families["petriage_jobs"].samples}
    assert jobs[("export", "dead")] == 1 and jobs[("infer", "running")] == 1 and jobs[("infer", "succeeded")] == 3
    assert jobs[("infer", "dead")] == 2
    exports = {s.labels["outcome"]: s.value for s in families["petriage_exports"].samples if s.name.endswith("_total")}
    assert exports["failed"] == 1 and exports["delivered"] == 1
    hist = families["petriage_inference_seconds"]
    count = [s.value for s in hist.samples if s.name.endswith("_count")]
    assert count == [3]
    bucket_20 = [s.value for s in hist.samples if s.name.endswith("_bucket") and s.labels["le"] == "20.0"]
    assert bucket_20 == [3]
    rejected = [s.value for s in families["petriage_series_rejected"].samples if s.name.endswith("_total")]
    assert rejected == [3]  # the scout, the head CT, the non-contrast chest
    assert "petriage_instances_received" in families
    # a second scrape reads only new results and gives the same numbers
    again = {f.name: f for f in text_string_to_metric_families(console.client.get("/metrics").text)}
    assert [s.value for s in again["petriage_inference_seconds"].samples if s.name.endswith("_count")] == [3]


def test_result_json_with_odd_values_still_renders(console: Console) -> None:
    from pe_triage_node.db.models import TriageResult

    with Session(console.engine) as s, s.begin():
        for r in s.scalars(select(TriageResult)):
            r.result_json = json.dumps({"attention": "nonsense", "thresholds": [1], "timings_s": None})
            r.probabilities = "not json"
    console.sign_in(web_seed.VIEWER)
    assert console.client.get(f"/study/{console.ids.stat_id}").status_code == 200
    assert console.client.get("/").status_code == 200
    assert console.client.get("/metrics").status_code == 200


def test_password_guessing_locks_the_name(console: Console) -> None:
    c = console.client
    r = c.get("/signin")
    for _ in range(10):
        token = CSRF_RE.search(r.text).group(1)  # type: ignore[union-attr]
        r = c.post("/signin", data={"username": "victor", "password": "guess guess", "csrf_token": token})
        assert r.status_code == 401
    token = CSRF_RE.search(r.text).group(1)  # type: ignore[union-attr]
    r = c.post("/signin", data={"username": "victor", "password": web_seed.VIEWER[1], "csrf_token": token})
    assert r.status_code == 401  # even the right password, for 15 minutes
    console.sign_in(web_seed.ADMIN)  # other names are not affected


def test_worker_dicom_secondary_captures_are_shown_as_png(console: Console) -> None:
    """Without PNGs, the study page shows the worker's DICOM Secondary Captures, converted."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = console.cfg.node.var_dir / "outputs" / console.ids.stat_series_uid
    for p in folder.iterdir():
        p.unlink()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("sc.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 16, 16, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
    ds.PixelData = np.full((16, 16, 3), 200, dtype=np.uint8).tobytes()
    ds.save_as(folder / "sc_summary.dcm", enforce_file_format=True)
    (folder / "notes.dcm").write_bytes(b"not dicom")
    console.sign_in(web_seed.VIEWER)
    html = console.client.get(f"/study/{console.ids.stat_id}").text
    assert f'/study/{console.ids.stat_id}/image/sc_summary.dcm"' in html and "notes.dcm" not in html
    r = console.client.get(f"/study/{console.ids.stat_id}/image/sc_summary.dcm")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert console.client.get(f"/study/{console.ids.stat_id}/image/notes.dcm").status_code == 404


def test_later_delivery_clears_export_failed(console: Console) -> None:
    with Session(console.engine) as s, s.begin():
        dead = s.get(Job, console.ids.export_dead_job)
        assert dead is not None
        s.add(Job(kind=JobKind.export, state=JobState.succeeded, priority=100, study_instance_uid=dead.study_instance_uid,
                  series_instance_uid=dead.series_instance_uid, payload=dead.payload, dedupe_key="export:PACS_MAIN:new"))
    console.sign_in(web_seed.VIEWER)
    assert _order(console.client.get("/?status=export+failed").text) == []
    assert console.ids.stat_id in _order(console.client.get("/?status=done").text)


def test_image_files_only_under_a_valid_uid(tmp_path: Path) -> None:
    """The output folder's name is checked with dicom.uids (fullmatch): a trailing newline is not a UID."""
    from pe_triage_node.web.study import image_path, output_images

    cfg = NodeConfig(node={"var_dir": str(tmp_path)})  # type: ignore[arg-type]
    for name in ("1.2.3", "1.2.3\n", "1.02.3"):
        web_seed.gradcam_png(cfg.resolve(cfg.export.outputs_dir) / name / "summary.png")
    assert image_path(cfg, "1.2.3", "summary.png") == cfg.resolve(cfg.export.outputs_dir) / "1.2.3" / "summary.png"
    assert output_images(cfg, "1.2.3") == ["summary.png"]
    for bad in ("1.2.3\n", "1.02.3", "1.2.3/..", ""):
        assert image_path(cfg, bad, "summary.png") is None and output_images(cfg, bad) == [], repr(bad)
    assert image_path(cfg, "1.2.3", "summary.png\n") is None
