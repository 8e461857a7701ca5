"""End to end in a real browser: Debian's Chromium driven by Playwright against `dpo-kernels app`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser import CHROMIUM, chromium_page, running_app

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)"),
]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _keep(path: Path) -> None:
    """Copy a screenshot next to the repository too, so it survives pytest's tmp cleanup."""
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)


def test_upload_validate_save_and_list(tmp_path, hh_sample_path):
    ws = tmp_path / "ws"
    upload = tmp_path / "my_pairs.jsonl.gz"
    shutil.copy(hh_sample_path, upload)
    with running_app(ws, tmp_path / "app.log", with_worker=False) as url, chromium_page() as page:
        page.goto(f"{url}/datasets")
        page.get_by_text("Upload preference pairs").wait_for()
        page.locator('input[type="file"]').set_input_files(str(upload))
        page.get_by_text("Validation report").wait_for()
        page.get_by_text("Rows in file").wait_for()
        body = page.inner_text("body")
        assert "400" in body and "hh" in body
        name = page.get_by_label("Dataset name")
        name.fill("e2e-hh")
        name.press("Enter")
        page.get_by_role("button", name="Save dataset").click()
        page.get_by_text("Saved dataset").wait_for()
        shot = tmp_path / "datasets_saved.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        assert "e2e-hh" in page.inner_text("body")

        page.get_by_role("tab", name="Your datasets").click()
        page.get_by_text("Download jsonl").wait_for()
        page.locator('[data-testid="stSelectbox"]').last.click()
        options = page.get_by_role("option").all_inner_texts()
        assert any(o.startswith("e2e-hh") for o in options), options
        assert any(o.startswith("hh-harmless-sample") for o in options), options
        shot = tmp_path / "datasets_listed.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
