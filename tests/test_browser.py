"""Tier 3: a real browser (Debian chromium through Python playwright) drives the real app."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "app_screenshot.png"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from magic_demo.service import DemoService
    from magic_demo.ui import launch_local

    service = DemoService("tiny-random", outputs_dir=tmp_path_factory.mktemp("outputs"))
    service.warm_up()
    demo, url = launch_local(service)
    yield url
    demo.close()


def test_upload_generate_and_watch_the_video(app_url, tmp_path):
    assert Path(CHROMIUM).exists(), "Debian chromium is needed: apt-get install -y chromium (run_tests.sh does it)"
    from playwright.sync_api import expect, sync_playwright

    frame = tmp_path / "frame.png"
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[20:40, 10:30] = (230, 40, 40)
    Image.fromarray(arr).save(frame)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        page.locator("#prompt textarea").fill("a red square moves right on a black background")
        page.get_by_role("tab", name="Upload").click()
        page.locator("#upload input[type=file]").set_input_files(str(frame))
        expect(page.locator("#first-frame img")).to_be_visible(timeout=30_000)
        page.locator("#generate").click()
        expect(page.locator("#status")).to_contain_text("Done", timeout=120_000)
        expect(page.locator("#video video")).to_have_count(1, timeout=30_000)
        src = page.locator("#video video").get_attribute("src")
        assert src and ".mp4" in src
        status = page.locator("#status").inner_text()
        assert "16 frames" in status and "2 / 2 windows" in status
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("SAVE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, SCREENSHOT)


def test_clicking_an_example_fills_the_form_and_plays_its_video(app_url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        page.get_by_text("a red circle moves left on a black background").first.click()
        expect(page.locator("#prompt textarea")).to_have_value("a red circle moves left on a black background",
                                                              timeout=30_000)
        expect(page.locator("#first-frame img")).to_be_visible(timeout=30_000)
        expect(page.locator("#status")).to_contain_text("Example:", timeout=120_000)
        expect(page.locator("#video video")).to_have_count(1, timeout=30_000)
        browser.close()
