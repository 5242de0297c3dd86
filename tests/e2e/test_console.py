"""The web console in a real browser (Debian's Chromium, headless, driven by Playwright)
against the session's server: sign in, a job followed live to its end with its curves,
events and checkpoints, files, the playground streaming the base model and the tuned one
side by side, and another organization seeing none of it. Screenshots are kept in
`test-artifacts/console/` (FTAAS_TEST_ARTIFACTS to put them elsewhere)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import QUESTIONS, memorisation_jsonl
from tests.e2e.conftest import (
    API_KEY,
    OTHER_API_KEY,
    ROOT,
    TINY,
    create_memorisation_job,
    greedy,
    wait_for_serving,
)

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root on a machine with a closed network: no sandbox, no background connections.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("FTAAS_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "console"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def client(server) -> OpenAI:  # type: ignore[no-untyped-def]
    client = server.client()
    wait_for_serving(client, TINY)
    return client


@pytest.fixture(scope="module")
def browser() -> Iterator:  # type: ignore[type-arg]
    if CHROMIUM is None:
        message = "Chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def sign_in(page, base_url: str, key: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{base_url}/console")
    page.fill("#api-key", key)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#jobs:not([hidden])")


def test_a_job_followed_in_the_console_from_start_to_its_tuned_models_answer(
    browser,  # type: ignore[no-untyped-def]
    server,
    client: OpenAI,
):
    training = client.files.create(
        file=("console.jsonl", memorisation_jsonl()), purpose="fine-tune"
    )
    job = create_memorisation_job(client, training.id)
    from playwright.sync_api import expect

    # The page's own Content-Security-Policy holds: the test's waits read the page through
    # Playwright's selectors, never by evaluating script in it.
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda line: errors.append(line.text) if line.type == "error" else None)

    # A wrong key is refused with the server's words; the right one opens the jobs.
    page.goto(f"{server.base_url}/console")
    page.fill("#api-key", "not-a-key")
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#alert:not([hidden])")
    assert "not valid" in page.inner_text("#alert")
    assert page.is_visible("#sign-in")
    errors.clear()  # the browser logs the refused request itself
    sign_in(page, server.base_url, API_KEY)
    page.wait_for_selector(f"#jobs-rows a:text-is('{job.id}')")

    # The job's page follows it live (polling) until it succeeds.
    page.click(f"#jobs-rows a:text-is('{job.id}')")
    seen = {page.wait_for_selector("#job-status").inner_text()}
    page.screenshot(path=str(ARTIFACTS / "job-running.png"), full_page=True)
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=600_000)
    seen.add("succeeded")
    tuned = client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
    assert tuned and page.inner_text("#job-facts").count(tuned) == 1
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
    expect(page.locator("#events li")).to_have_count(len(events), timeout=10_000)
    metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    line = page.locator("#loss-chart polyline[data-series=train_loss]")
    assert line.get_attribute("data-points") == str(len(metrics)) and len(metrics) > 1
    last = f"train_loss: {metrics[-1]['train_loss']:.4f}"
    assert page.inner_text("#loss-chart .legend").startswith(last)
    # The events in the order the API gives them (newest first): the tuned model's last.
    assert page.locator("#events li").first.inner_text().endswith(events[0].message)
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert page.locator("#checkpoint-rows tr").count() == len(checkpoints) > 0
    assert page.is_hidden("#reward-chart")  # a supervised job has no reward
    page.screenshot(path=str(ARTIFACTS / "job-succeeded.png"), full_page=True)

    # The playground, opened from the job, streams both models side by side: each answer is
    # the one the API gives the SDK.
    page.click("#job-playground")
    page.wait_for_selector("#playground:not([hidden])")
    expect(page.locator("#right-model")).to_have_value(tuned)
    assert page.input_value("#left-model") == TINY
    page.fill("#prompt", QUESTIONS[0])
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.click("#send")
    for pane in ("#left-answer", "#right-answer"):
        finished = re.compile("done|error|stopped")
        expect(page.locator(pane)).to_have_attribute("data-state", finished, timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    for pane, model in (("#left-answer", TINY), ("#right-answer", tuned)):
        assert page.get_attribute(pane, "data-state") == "done", page.inner_text(pane)
        shown = page.inner_text(f"{pane} .answer-text")
        assert shown == greedy(client, model, QUESTIONS[0], max_tokens=MAX_TOKENS)
        assert "first token" in page.inner_text(f"{pane} .answer-status")
    assert page.inner_text("#left-answer .answer-text") != page.inner_text(
        "#right-answer .answer-text"
    )

    # Files: the training file is listed; one uploaded through the page is stored whole.
    page.click("#nav a[data-view=files]")
    page.wait_for_selector(f"#files-rows td:text-is('{training.id}')")

    def named(name: str) -> list:  # type: ignore[type-arg]
        return [f for f in client.files.list() if f.filename == name]

    before = len(named("from-the-console.jsonl"))
    page.set_input_files(
        "#upload-file",
        {
            "name": "from-the-console.jsonl",
            "mimeType": "application/jsonl",
            "buffer": memorisation_jsonl(),
        },
    )
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#files-rows td:text-is('from-the-console.jsonl')")
    uploaded = named("from-the-console.jsonl")
    assert len(uploaded) == before + 1
    newest = max(uploaded, key=lambda f: f.created_at)
    assert client.files.content(newest.id).content == memorisation_jsonl()
    page.screenshot(path=str(ARTIFACTS / "files.png"), full_page=True)
    assert errors == [], errors
    assert seen  # the statuses the page showed, e.g. {'running', 'succeeded'}

    # Another organization, in the same browser after signing out, sees none of it.
    page.click("#sign-out")
    page.wait_for_selector("#sign-in:not([hidden])")
    sign_in(page, server.base_url, OTHER_API_KEY)
    page.wait_for_timeout(500)
    assert job.id not in page.inner_text("#jobs")
    page.goto(f"{server.base_url}/console#/jobs/{job.id}")
    page.wait_for_selector("#alert:not([hidden])")
    assert page.inner_text("#job-title") == ""
    page.click("#nav a[data-view=files]")
    page.wait_for_timeout(500)
    assert training.id not in page.inner_text("#files")
    page.close()
