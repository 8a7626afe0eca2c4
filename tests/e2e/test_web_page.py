"""The web page in headless Chromium, through a real Envoy and an ingesting mesh.

Debian's ``chromium`` (installed by ``make browser``, which ``make test`` runs)
driven by Playwright with ``executable_path``: Playwright never downloads a
browser here. A screenshot is saved as test-artifacts/web-page.png.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests import documents
from tests.e2e.conftest import IngestingMesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# Generous: the first ingestion loads the embedding model.
INGEST_MS = 300_000


def chromium_path() -> str:
    """KBMESH_CHROMIUM, else Debian's chromium; missing is a failure, not a skip."""
    configured = os.environ.get("KBMESH_CHROMIUM")
    found = configured or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)")
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            # Root in a container: no user namespaces for the sandbox.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def drop_files(page: Page, files: list[tuple[str, bytes, str]]) -> None:
    """Drops files on the drop zone as a user's drag and drop would."""
    payload = [
        {"name": name, "b64": base64.b64encode(data).decode(), "type": media_type}
        for name, data, media_type in files
    ]
    await page.evaluate(
        """(files) => {
            const dt = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
                dt.items.add(new File([bytes], f.name, { type: f.type }));
            }
            const zone = document.getElementById("dropzone");
            const init = { dataTransfer: dt, bubbles: true, cancelable: true };
            zone.dispatchEvent(new DragEvent("drop", init));
        }""",
        payload,
    )


async def test_create_upload_watch_search(
    browser: Browser, ingesting_mesh: IngestingMesh, artifacts: Path
) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    await page.goto(ingesting_mesh.envoy.http_url + "/")
    await expect(page).to_have_title("kbmesh")

    # Watch every state an upload row goes through.
    await page.evaluate(
        """() => {
            window.seenStates = {};
            new MutationObserver((records) => {
                for (const r of records) {
                    const row = r.target.closest && r.target.closest(".upload");
                    if (!row) continue;
                    const name = row.dataset.filename;
                    const seen = (window.seenStates[name] = window.seenStates[name] || []);
                    seen.push(row.dataset.state);
                }
            }).observe(document.getElementById("uploads"), {
                subtree: true, childList: true, attributes: true, attributeFilter: ["data-state"],
            });
        }"""
    )

    name = "Handbook " + os.urandom(3).hex()
    await page.fill("#kb-name", name)
    await page.click("#kb-create")
    await expect(page.locator("#kb-title")).to_have_text(name)
    await expect(page.locator(".kb-item.active")).to_contain_text(name)

    pdf = documents.pdf(
        [("Billing", "Invoices are due within thirty days."), ("Support", "Call us anytime.")]
    )
    await drop_files(
        page,
        [
            ("guide.md", documents.MARKDOWN, "text/markdown"),
            ("billing.pdf", pdf, "application/pdf"),
        ],
    )
    for filename in ("guide.md", "billing.pdf"):
        row = page.locator(f'.upload[data-filename="{filename}"]')
        await expect(row).to_have_attribute("data-state", "SUCCEEDED", timeout=INGEST_MS)
        await expect(row).to_contain_text("searchable")
        doc = page.locator(f'tr.doc[data-filename="{filename}"]')
        await expect(doc).to_have_attribute("data-state", "SUCCEEDED", timeout=30_000)
    seen = await page.evaluate("() => window.seenStates")
    for filename in ("guide.md", "billing.pdf"):
        assert "UPLOADING" in seen[filename], seen
        assert seen[filename][-1] == "SUCCEEDED", seen

    await page.fill("#search-query", "which command starts the stack")
    await page.click("#search-button")
    first = page.locator(".result").first
    await expect(first).to_have_attribute("data-filename", "guide.md")
    await expect(first).to_contain_text("make up")
    await expect(first.locator(".result-head")).to_contain_text("chunk")

    await page.fill("#search-query", "when are invoices due")
    await page.click("#search-button")
    await expect(page.locator(".result").first).to_have_attribute("data-filename", "billing.pdf")
    await expect(page.locator(".result").first).to_contain_text("page 1")

    await page.screenshot(path=str(artifacts / "web-page.png"), full_page=True)
    assert not problems, problems


async def test_errors_in_plain_words_and_api_key_header(
    browser: Browser, ingesting_mesh: IngestingMesh
) -> None:
    page = await browser.new_page()
    await page.goto(ingesting_mesh.envoy.http_url + "/")
    name = "dup-" + os.urandom(3).hex()
    await page.fill("#kb-name", name)
    await page.click("#kb-create")
    await expect(page.locator("#kb-title")).to_have_text(name)
    await page.fill("#kb-name", name)
    await page.click("#kb-create")
    await expect(page.locator("#notice")).to_be_visible()
    await expect(page.locator("#notice-text")).to_contain_text(
        "A knowledge base with this name already exists."
    )

    # The optional API key is sent as a bearer token on API calls.
    async with page.expect_request(lambda r: "/api/v1/knowledge-bases" in r.url) as sent:
        await page.click("#apikey-summary")
        await page.fill("#apikey", "kbm_test_key")
        await page.click("#apikey-form button")
    request = await sent.value
    assert await request.header_value("authorization") == "Bearer kbm_test_key"
    assert await page.evaluate("() => localStorage.getItem('kbmesh.apiKey')") == "kbm_test_key"

    # With a key, progress comes from the SSE route read by fetch() (EventSource
    # cannot send the header): the upload still ends SUCCEEDED on the page.
    await expect(page.locator("#kb-title")).to_have_text(name)
    async with page.expect_request(lambda r: r.url.endswith(":sse")) as watched:
        await drop_files(page, [("notes.txt", documents.TEXT, "text/plain")])
    sse = await watched.value
    assert await sse.header_value("authorization") == "Bearer kbm_test_key"
    assert sse.resource_type == "fetch"
    row = page.locator('.upload[data-filename="notes.txt"]')
    await expect(row).to_have_attribute("data-state", "SUCCEEDED", timeout=INGEST_MS)
