"""Several people on one app at once: browser sessions that upload, diagnose and submit training.

Each session is its own Chromium context (its own Streamlit session) against one running app
and its one worker. Sessions first upload and store a small file of their own (all at once),
then each queues a diagnosis and a training run. Page latency is the time from navigation to
the page's first known element. Used by tests/test_load.py (few sessions, correctness) and
scripts/bench_load.py (more sessions, p50/p95 latency).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.browser import CHROMIUM, CHROMIUM_ARGS

PAGE_MARKERS = {
    "datasets": "Upload preference pairs",
    "diagnose": "Embedding options",
    "train": "Start training",
    "jobs": "this page follows them live",
}


@dataclass
class SessionLog:
    index: int
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def timed(self, page_name: str, seconds: float) -> None:
        self.latencies.setdefault(page_name, []).append(seconds)


def session_files(sample: Path, folder: Path, n_sessions: int, pairs_each: int = 30) -> list[Path]:
    """One small JSONL upload per session, its prompts tagged so that every file is distinct."""
    rows = [json.loads(line) for line in gzip.open(sample, "rt")]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_sessions):
        path = folder / f"load_{i}.jsonl"
        with open(path, "w") as out:
            for row in rows[i * pairs_each : (i + 1) * pairs_each]:
                tag = f"\n\nHuman: [session {i}]"
                tagged = {k: v.replace("\n\nHuman:", tag, 1) for k, v in row.items()}
                out.write(json.dumps(tagged) + "\n")
        paths.append(path)
    return paths


async def _open(page, url: str, name: str, log: SessionLog) -> None:
    start = time.perf_counter()
    await page.goto(f"{url}/{name}")
    await page.get_by_text(PAGE_MARKERS[name], exact=False).first.wait_for(timeout=120_000)
    log.timed(name, time.perf_counter() - start)


async def _upload(page, url: str, upload: Path, log: SessionLog) -> None:
    await _open(page, url, "datasets", log)
    await page.locator('input[type="file"]').set_input_files(str(upload))
    await page.get_by_text("Validation report").wait_for(timeout=300_000)
    name = page.get_by_label("Dataset name")
    await name.fill(f"load-{log.index}")
    await name.press("Enter")
    await page.get_by_role("button", name="Save dataset").click()
    await page.get_by_text("Saved dataset").wait_for(timeout=300_000)


async def _submit(page, url: str, log: SessionLog) -> None:
    await _open(page, url, "diagnose", log)
    await page.get_by_role("button", name="Run diagnosis").click()
    await page.get_by_text("diagnose #").first.wait_for(timeout=120_000)
    await _open(page, url, "train", log)
    await page.get_by_role("button", name="Start training").click()
    await page.wait_for_url("**/runs**", timeout=120_000)
    await _open(page, url, "jobs", log)


async def _drive(url: str, uploads: list[Path]) -> list[SessionLog]:
    from playwright.async_api import async_playwright

    logs = [SessionLog(i) for i in range(len(uploads))]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            contexts = [await browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in uploads]
            for context in contexts:  # several sessions share two cores with the app and its worker
                context.set_default_timeout(120_000)
            pages = [await c.new_page() for c in contexts]

            async def phase(step, *args):
                async def one(i):
                    try:
                        await step(pages[i], url, *(a[i] for a in args), logs[i])
                    except Exception as exc:  # noqa: BLE001 - recorded per session, asserted by the caller
                        logs[i].errors.append(f"{step.__name__}: {type(exc).__name__}: {str(exc).splitlines()[0]}")

                await asyncio.gather(*(one(i) for i in range(len(uploads))))

            await phase(_upload, uploads)
            await phase(_submit)
        finally:
            await browser.close()
    return logs


def run_sessions(url: str, uploads: list[Path]) -> list[SessionLog]:
    """Drive one browser session per upload against the app at `url`, all at once."""
    return asyncio.run(_drive(url, uploads))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]
