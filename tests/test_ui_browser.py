"""A person's path through the Prefect UI, in Debian's Chromium driven headless by Playwright.

Open the UI, find the `constitutional-ai` deployment, start a Quick run (the stack's default
preset is the tiny one), follow it to Completed and open its artifacts, down to the evaluation
report's pictures (set CAIFLOW_SCREENSHOTS=DIR to keep the screenshots). No browser is
downloaded: Playwright drives /usr/bin/chromium (Debian's package `chromium`).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest_plugins = ["tests.prefect_server"]
pytestmark = pytest.mark.slow

STEPS = ["prompts", "critique_revision", "sft", "preferences", "reward_model", "rl", "baseline", "evaluate"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root, with no network: no sandbox, no GPU, and none of Chromium's background connections.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append("Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install playwright; no browser download needed)")
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run it
        pytest.skip(message)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def quick_run(page, stack, before: set, shots, tries: int = 3) -> list[str]:
    """Run > Quick run on the open deployment page; the ids of the flow runs it created.

    On a busy machine the menu's click has been lost (no run created, no toast): after 30 s without
    a new run, the menu is opened and clicked again, up to `tries` times, with a screenshot of what
    the page showed each time.
    """
    page.wait_for_load_state("networkidle")
    for attempt in range(1, tries + 1):
        page.get_by_role("button", name="Run", exact=True).click()
        item = page.get_by_text("Quick run", exact=True)
        item.wait_for(state="visible")
        item.click()
        waited_until = time.monotonic() + 30
        while time.monotonic() < waited_until:
            new = [str(fr.id) for fr in stack.flow_runs_of("constitutional-ai") if fr.id not in before]
            if new:
                return new
            time.sleep(0.5)
        page.screenshot(path=str(shots / f"quick-run-{attempt}-no-run.png"), full_page=True)
        page.keyboard.press("Escape")  # close the menu if it is still open
    return []


def test_quick_run_from_the_ui_completes_and_shows_artifacts(prefect_stack, browser, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    before = {fr.id for fr in prefect_stack.flow_runs_of("constitutional-ai")}
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{prefect_stack.ui_url}/deployments", wait_until="networkidle")
        page.get_by_role("link", name="constitutional-ai", exact=True).first.click()
        page.wait_for_url("**/deployments/deployment/**")
        expect(page.get_by_text("Work Pool")).to_be_visible()

        new_ids = quick_run(page, prefect_stack, before, tmp_path)
        assert len(new_ids) == 1, (
            f"Quick run created {len(new_ids)} flow runs, not one "
            f"(screenshots in {tmp_path}; set CAIFLOW_SCREENSHOTS=DIR to keep them)"
        )
        # "View run" on the "scheduled to start now" toast (the UI mounts its toast layer twice; the
        # last copy is the one on top). The toast closes itself after a few seconds, which on a busy
        # machine can come before the click: then open the run the way a person would without it.
        try:
            page.get_by_role("button", name="View run").last.click(timeout=15_000)
        except PlaywrightTimeout:
            page.goto(f"{prefect_stack.ui_url}/runs/flow-run/{new_ids[0]}", wait_until="networkidle")
        page.wait_for_url("**/runs/flow-run/**")
        flow_run_id = page.url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        assert flow_run_id == new_ids[0]

        # the state badge in the run page's heading follows the run live; reload now and then in
        # case an update is missed
        badge = page.locator(".page-heading-flow-run__meta .state-badge")
        deadline = time.monotonic() + 900
        while True:
            try:
                expect(badge).to_have_text("Completed", timeout=10_000)
                break
            except AssertionError:
                fr = prefect_stack.flow_run(flow_run_id)
                assert not (fr.state.is_final() and not fr.state.is_completed()), (
                    f"the run ended {fr.state.name}: {fr.state.message}"
                )
                assert time.monotonic() < deadline, (
                    f"still {fr.state.name}: {prefect_stack.state_names(flow_run_id)}"
                )
                page.reload(wait_until="networkidle")
        page.screenshot(path=str(tmp_path / "flow-run.png"))

        page.get_by_text("Artifacts", exact=True).first.click()  # the tab under the run's timeline
        for key in (
            "run-summary",
            "prompts-preview",
            "critique-revision-report",
            "critique-revision-progress",
        ):
            expect(page.get_by_text(key, exact=True).first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(tmp_path / "artifacts.png"), full_page=True)

        # open the run summary: a table with a row per step, each computed (a fresh storage root)
        page.get_by_text("run-summary", exact=True).first.click()
        page.wait_for_url("**/artifacts/artifact/**")
        rows = page.locator("table tbody tr")
        expect(rows).to_have_count(len(STEPS), timeout=30_000)
        expect(rows.locator("td:nth-child(1)")).to_have_text(STEPS)
        expect(rows.locator("td:nth-child(2)")).to_have_text(["computed"] * len(STEPS))
        page.screenshot(path=str(tmp_path / "run-summary.png"), full_page=True)

        # the evaluation report with its pictures: each one decoded and drawn, not a broken image
        page.go_back(wait_until="networkidle")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("evaluate-report", exact=True).first.click()
        page.wait_for_url("**/artifacts/artifact/**")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(tmp_path / "evaluate-report-top.png"))
        expect(page.get_by_role("heading", name="Verdict").first).to_be_visible(timeout=30_000)
        for title in (
            "Refusal and over-refusal per stage",
            "Reward-model scores per stage",
            "RL reward, KL and length over steps",
            "Elo ratings with 95% intervals",
        ):
            image = page.locator(f"img[alt='{title}']")
            expect(image).to_be_visible(timeout=30_000)
            image.scroll_into_view_if_needed()
            size = image.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
            assert size[0] and size[1] > 200 and size[2] > 100, (title, size)
        page.screenshot(path=str(tmp_path / "evaluate-report.png"), full_page=True)
    finally:
        keep = os.environ.get("CAIFLOW_SCREENSHOTS")  # a folder to keep the screenshots in, for a person
        if keep:
            shutil.copytree(tmp_path, keep, dirs_exist_ok=True)
        page.close()
    new = [fr for fr in prefect_stack.flow_runs_of("constitutional-ai") if fr.id not in before]
    assert [str(fr.id) for fr in new] == [flow_run_id]  # one click, one run, on the worker's pool
    assert new[0].state.is_completed() and new[0].work_pool_name == "gpu"
    assert new[0].parameters == {
        "config": "configs/tiny.yaml"
    }  # the Quick run took the deployment's defaults
