"""Generate click -> first window on screen, in a real browser (issue 8, benchmark 5). Prints figures; not a test.

    .venv/bin/python bench/bench_browser.py --preset mini --threads 2 --rounds 5

Debian chromium through Python playwright drives the real app (in-process server). In the page, a
MutationObserver stamps `performance.now()` when the video player's source changes after the click; the engine's
own time to its first window comes from the same job's report. Warm rounds after one warm-up generation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench.bench_engine import PROMPT, first_frame  # noqa: E402
from magic_demo.events import VideoFinished  # noqa: E402
from magic_demo.presets import get_preset  # noqa: E402
from magic_demo.service import DemoService  # noqa: E402
from magic_demo.ui import launch_local  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
WATCH = """() => { window.__clicked = null; window.__shown = null; if (window.__obs) window.__obs.disconnect();
  const root = document.querySelector('#video');
  const old = (root.querySelector('video') || {}).src || '';
  window.__obs = new MutationObserver(() => { const v = root.querySelector('video');
    if (window.__clicked !== null && window.__shown === null && v && v.src && v.src !== old
        && v.src.includes('.mp4')) window.__shown = performance.now(); })
  window.__obs.observe(root, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
  if (!window.__listening) { window.__listening = true;
    document.querySelector('#generate').addEventListener('click', () => { window.__clicked = performance.now(); },
                                                         {capture: true}); } }"""


class ReportingService(DemoService):
    """The app's service, keeping the last job's report (for the engine's own first-window time)."""

    last_report: dict = {}

    def run_video(self, *args, **kwargs):
        for event in super().run_video(*args, **kwargs):
            if isinstance(event, VideoFinished):
                self.last_report = event.report
            yield event


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from playwright.sync_api import expect, sync_playwright

    outputs = Path(tempfile.mkdtemp())
    service = ReportingService(args.preset, outputs_dir=outputs)
    service.warm_up()
    demo, url = launch_local(service)
    frame = outputs / "frame.png"
    first_frame(get_preset(args.preset).width).save(frame)
    clicks, engine = [], []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.get_by_role("tab", name="Upload").click()
            page.locator("#upload input[type=file]").set_input_files(str(frame))
            expect(page.locator("#first-frame img")).to_be_visible(timeout=30_000)
            for i in range(args.rounds + 1):  # round 0 warms up
                page.evaluate(WATCH)
                page.locator("#generate").click()
                page.wait_for_function("window.__shown !== null", timeout=60_000, polling="raf")
                expect(page.locator("#status")).to_contain_text("Done", timeout=120_000)
                shown = page.evaluate("window.__shown - window.__clicked") / 1000.0
                if i:
                    clicks.append(shown)
                    engine.append(service.last_report["time_to_first_window_s"])
                page.wait_for_timeout(300)
            browser.close()
    finally:
        demo.close()
    result = {"machine": f"{os.cpu_count()} cores, {args.threads} threads", "preset": args.preset,
              "click_to_first_window_s": [round(c, 3) for c in clicks], "engine_first_window_s": engine,
              "median_ratio": round(statistics.median(clicks) / statistics.median(engine), 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
