"""eval's index.html in a real browser: headless Chromium loads it from disk, and the success table and the
videos are in the rendered DOM, and a screenshot comes out. `make sysdeps` (run by `make test`) installs
Chromium (scripts/ensure_chromium.sh); nothing here downloads anything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from damvla.evaluation.report import write_results
from test_eval_report import results_doc

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed and tests do not install it: run `make sysdeps` "
                "(scripts/ensure_chromium.sh, apt)")  # fmt: skip


def headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run, isolated (fresh profile) and offline (no background traffic)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=180)


def test_index_html_renders_with_the_success_table_and_inline_videos(tmp_path):
    binary = browser()
    out = tmp_path / "eval"
    out.mkdir()
    write_results(out, results_doc(out), "tiny on reach,pick-place")
    url = (out / "index.html").as_uri()

    dom = headless(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<table id="success">' in html and "<td>reach-v3</td>" in html and "<td>average</td>" in html
    assert html.count("<video") == 2 and 'src="videos/reach-v3/seed-1000000.mp4"' in html
    assert '<table id="phases">' in html and "<img" in html

    png = tmp_path / "page.png"
    shot = headless(binary, tmp_path / "profile-shot", f"--screenshot={png}", "--window-size=1200,1600", url)
    assert shot.returncode == 0, shot.stderr[-2000:]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
