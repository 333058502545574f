"""Load and faults on the shipped miniature preset: concurrent clients, a bounded queue, memory over many
generations, clients that go away, and a process killed while saving an index."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from gradio_client import Client, handle_file

from magic_demo.video_io import read_video
from tests.conftest import EXAMPLE_FIRST_FRAME, EXAMPLE_PROMPT, ROOT, launch_app

def submit(client, seconds=1.0):
    return client.submit(handle_file(str(EXAMPLE_FIRST_FRAME)), EXAMPLE_PROMPT, seconds, 8, 4, 1, 0,
                         api_name="/generate")


def test_eight_clients_three_requests_each(tmp_path):
    demo, service, url = launch_app(tmp_path)
    try:
        clients = [Client(url, verbose=False) for _ in range(8)]
        jobs = [submit(c) for c in clients for _ in range(3)]
        ranks = set()
        while not all(j.done() for j in jobs):
            for j in jobs:
                st = j.status()
                if st.rank is not None:
                    ranks.add(st.rank)
            time.sleep(0.05)
        results = [j.result() for j in jobs]
        assert len(results) == 24
        for video, status, report, seed in results:
            assert status.startswith("Done") and report["frames"] == 8
            assert len(read_video(video)[0]) == 8
        assert len(ranks) > 1  # clients were told their place in the queue
    finally:
        demo.close()


def test_requests_past_the_queue_bound_are_refused(tmp_path):
    demo, service, url = launch_app(tmp_path, queue=2)
    try:
        client = Client(url, verbose=False)
        jobs = [submit(client, seconds=3.0) for _ in range(8)]
        outcomes = []
        for j in jobs:
            try:
                outcomes.append(j.result()[2]["frames"])
            except Exception as exc:  # refused: the message says why
                outcomes.append(str(exc))
        refused = [o for o in outcomes if isinstance(o, str)]
        assert refused and all("queue is full" in o.lower() for o in refused)
        assert 24 in outcomes  # the accepted ones completed
        assert submit(client).result()[2]["frames"] == 8  # and the server still serves
    finally:
        demo.close()


MEMORY_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from magic_demo.service import DemoService, VideoSettings
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024.0 for l in f if l.startswith("VmRSS:"))
service = DemoService("mini", outputs_dir={out!r}, keep_outputs=10)
frame = service.upload({first!r})
rss, frames = [], []
for i in range(50):
    *_, done = service.run_video("job", frame, {prompt!r}, VideoSettings(seconds=1.0, fps=8, steps=4, seed=i))
    frames.append(done.report["frames"])
    rss.append(rss_mb())
print(json.dumps({{"rss": rss, "frames": frames}}))
"""


def test_memory_and_outputs_stay_bounded_over_50_generations(tmp_path):
    # A fresh process, so the figure is the service's own and not what earlier tests left in this one.
    script = MEMORY_SCRIPT.format(root=str(ROOT), out=str(tmp_path / "outputs"), first=str(EXAMPLE_FIRST_FRAME),
                                  prompt=EXAMPLE_PROMPT)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["frames"] == [8] * 50
    rss = result["rss"]
    baseline = rss[4]  # after the first few (allocator warm-up)
    assert max(rss[5:]) <= 1.10 * baseline, (baseline, max(rss[5:]))
    assert len(list((tmp_path / "outputs").iterdir())) <= 11


def test_a_client_that_goes_away_does_not_leave_a_generation_running(tmp_path):
    demo, service, url = launch_app(tmp_path)
    try:
        client = Client(url, verbose=False)
        job = submit(client, seconds=60.0)
        deadline = time.time() + 60
        while service.running_jobs == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert service.running_jobs == 1
        job.cancel()
        deadline = time.time() + 30
        while service.running_jobs and time.time() < deadline:
            time.sleep(0.1)
        assert service.running_jobs == 0
        assert submit(client).result()[2]["frames"] == 8
    finally:
        demo.close()


def test_sigkill_while_saving_an_index_keeps_the_previous_one_loadable(tmp_path):
    from magic_demo.retrieval import RetrievalIndex

    index_dir = tmp_path / "index"
    gallery = ROOT / "assets" / "gallery"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from magic_demo.retrieval import RetrievalIndex
        index = RetrievalIndex.load({str(ROOT / 'assets' / 'gallery_index')!r})
        print("ready", flush=True)
        while True:
            index.save({str(index_dir)!r})
    """)
    first = subprocess.run([sys.executable, "-c", script.replace("while True:", "for _ in range(1):")],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    for delay in (0.05, 0.2, 0.5, 1.0):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = RetrievalIndex.load(index_dir)  # whatever moment the kill hit
        assert len(loaded) >= 500 and loaded.search_text(EXAMPLE_PROMPT, 1)
    assert gallery.is_dir()
