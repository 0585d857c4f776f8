"""The console in headless Debian Chromium (Playwright, never a downloaded browser), served by uvicorn.

Sign in, see the STAT study on top of the worklist (and a new study appear by the
live refresh), open it and see its Grad-CAM image, edit a rule, preview its
effect, save, see the history entry. Screenshots go to ``tests/artifacts/``.
With ``CI`` set, a missing chromium or Playwright fails the test instead of skipping it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from pe_triage_node.config import NodeConfig
from pe_triage_node.db.migrate import upgrade
from pe_triage_node.db.models import SeriesState
from pe_triage_node.db.session import make_engine
from pe_triage_node.rules.store import packaged_rules_text
from pe_triage_node.web.app import create_app

try:
    from tests import web_seed
except ImportError:  # pragma: no cover
    import web_seed  # type: ignore[no-redef]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; CI must install it (apt-get install -y chromium; pip install playwright)",
                    pytrace=False)
    pytest.skip(f"{what} is missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, NodeConfig, web_seed.Seeded]]:
    import uvicorn

    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    cfg = NodeConfig(node={"var_dir": str(tmp_path / "var")}, database={"url": url},  # type: ignore[arg-type]
                     web={"worklist_refresh_s": 2},
                     inference={"weights_manifest": str(web_seed.manifest(tmp_path / "model"))})
    engine = make_engine(url)
    ids = web_seed.seed(engine, cfg.node.var_dir)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, engine), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", cfg, ids
    finally:
        server.should_exit = True
        thread.join(10)
        engine.dispose()


def _add_late_study(cfg: NodeConfig) -> None:
    """A new URGENT study arriving while the worklist is open."""
    engine = make_engine(cfg.database_url)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        with Session(engine) as s, s.begin():
            st = web_seed._study(s, 9, "LATE^LARA", "P0009", "A1009", "CTPA", now)
            se = web_seed._series(s, st, 2, SeriesState.selected, now)
            web_seed._result(s, se, None, "URGENT", "Any PE", {"leftsided_pe": 0.66},
                             {**web_seed._labels(leftsided_pe=True), "pe_present_on_image": True}, [0.1, 0.7, 0.2], now)
    finally:
        engine.dispose()


def test_sign_in_worklist_study_and_rule_change(served: tuple[str, NodeConfig, web_seed.Seeded], tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        _missing(str(CHROMIUM))
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _missing("playwright (Python)")
    base, cfg, ids = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            # sign in (the worklist sends us to the sign-in page first)
            page.goto(base + "/")
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            page.get_by_label("User name").fill(web_seed.ADMIN[0])
            page.get_by_label("Password").fill(web_seed.ADMIN[1])
            page.get_by_role("button", name="Sign in").click()

            # the STAT study is on top
            rows = page.locator("#worklist-rows tr")
            expect(rows.first).to_have_attribute("data-study", str(ids.stat_id))
            expect(rows.first.locator(".badge")).to_have_text("STAT")
            expect(page.locator("footer")).to_contain_text("NOT FOR DIAGNOSTIC USE")
            # a dead analysis says it failed and why; a refused series says it was not analysed and why
            failed = page.locator(f'#worklist-rows tr[data-study="{ids.failed_id}"]')
            expect(failed.locator("td.findings")).to_contain_text("analysis failed")
            expect(failed.locator("td.findings .reason")).to_have_text(web_seed.FAILED_REASON)
            expect(failed.locator(".status")).to_have_text("failed")
            refused = page.locator(f'#worklist-rows tr[data-study="{ids.refused_id}"]')
            expect(refused.locator("td.findings")).to_contain_text("not analysed")
            expect(refused.locator("td.findings .reason")).to_have_text(web_seed.REFUSED_REASON)
            expect(refused.locator(".status")).to_have_text("rejected")
            expect(page.locator("#worklist-rows tr", has_text="in analysis")).to_have_count(1)  # the running one
            page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)

            # live refresh: a new study appears without reloading the page
            page.evaluate("window.__sameDocument = true")
            _add_late_study(cfg)
            expect(page.locator("#worklist-rows")).to_contain_text("LATE, LARA", timeout=10_000)
            if page.evaluate("window.__sameDocument") is not True:
                problems.append("the page was reloaded instead of refreshed in place")
            expect(rows.first).to_have_attribute("data-study", str(ids.stat_id))

            # open the STAT study: its Grad-CAM image is shown
            rows.first.locator("td.findings a").click()
            expect(page.locator("h1")).to_contain_text("central PE, RV/LV>=1")
            image = page.locator("img.gradcam").first
            expect(image).to_be_visible()
            page.wait_for_function("() => { const i = document.querySelector('img.gradcam'); return i && i.complete && i.naturalWidth > 0; }")
            expect(page.locator("#exports")).to_contain_text("PACS_MAIN")
            page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)

            # edit a rule, preview its effect, save with a comment, see the history entry
            page.get_by_role("link", name="Priority rules").click()
            edited = packaged_rules_text().replace('name = "Any PE"\npriority = "URGENT"', 'name = "Any PE"\npriority = "STAT"')
            page.locator("#toml_text").fill(edited)
            page.locator("#preview-btn").click()
            expect(page.locator("#preview")).to_contain_text("would change priority")
            expect(page.locator("#preview")).to_contain_text("RIGHT, ROBERT")
            page.screenshot(path=str(ARTIFACTS / "rules-preview.png"), full_page=True)
            page.locator("#comment").fill("every PE is STAT during the ED pilot")
            page.locator("#save-btn").click()
            expect(page.locator(".notice")).to_contain_text("is now in force")
            entry = page.locator("#history details").first
            expect(entry).to_contain_text("every PE is STAT during the ED pilot")
            expect(entry).to_contain_text("in force")
            entry.locator("summary").click()
            expect(entry.locator("pre.diff")).to_contain_text('+priority = "STAT"')
            expect(entry.locator("pre.diff .add")).to_have_count(2)  # "+++ rule set 1" and the one edited line
            page.screenshot(path=str(ARTIFACTS / "rules-history.png"), full_page=True)

            # operations: workers, associations, audit log of this session's change
            page.get_by_role("link", name="Operations").click()
            expect(page.locator("main")).to_contain_text("worker@gpu0")
            expect(page.locator("main")).to_contain_text("rules-activate")
            page.screenshot(path=str(ARTIFACTS / "ops.png"), full_page=True)
        finally:
            context.close()
    assert problems == []
