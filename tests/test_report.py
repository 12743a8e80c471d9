"""`adaclip report` and `compare --report`: one self-contained HTML file (every section, images inline,
nothing fetched), PNGs beside it with --png, and the page as a person sees it in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from typer.testing import CliRunner

from adaclip.cli import app
from adaclip.report import MAX_MISTAKES, PNG_SECTIONS, SECTIONS

from .conftest import TINY

runner = CliRunner()
TINY_ARGS = ["--backbone", TINY, "--pretrained", "none", "--device", "cpu"]
# Anything a page could fetch: src=, href=, srcset=, CSS url(...) and @import, that is not inline data.
EXTERNAL = re.compile(
    r"""(?:\b(?:src|href|srcset|action|poster)\s*=\s*["']?\s*(?!data:|#)[^"'\s>]+)"""
    r"""|url\(\s*["']?\s*(?!data:)[^)]+\)|@import""",
    re.IGNORECASE,
)


def external_references(page: str) -> list[str]:
    return EXTERNAL.findall(page)


@pytest.fixture(scope="module")
def probe(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "probe.adaclip"
    result = runner.invoke(
        app, ["fit", str(dataset), "-m", "linear-probe", "-o", str(out), "--epochs", "3", "--lr", "0.01", *TINY_ARGS]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def compare_report(dataset, tmp_path_factory) -> Path:
    html = tmp_path_factory.mktemp("compare-report") / "r.html"
    result = runner.invoke(
        app,
        ["compare", str(dataset), "-m", "zeroshot,linear-probe", "--seeds", "1,2", "--report", str(html), "--png",
         "--set", "linear-probe.train.epochs=3", *TINY_ARGS],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return html


def test_external_reference_detector_catches_what_a_page_could_fetch():
    assert external_references('<img src="data:image/png;base64,AAAA"><a href="#top">') == []
    for bad in ['<img src="http://x/y.png">', "<link href='s.css'>", "<div style=\"background: url(a.png)\">",
                "<style>@import 'x.css';</style>", "<img src=//cdn/x.png>"]:  # fmt: skip
        assert external_references(bad), bad


def test_report_of_an_adapter_on_labelled_data(probe, dataset, tmp_path):
    html = tmp_path / "probe.html"
    result = runner.invoke(app, ["report", str(probe), str(dataset), "-o", str(html), "--png", "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["report"] == str(html) and summary["images"] == 24  # test/ of the folder
    page = html.read_text()
    for key in ("confusion", "per-class", "curves", "mistakes"):
        assert f'<section id="{key}">' in page
    assert '<section id="leaderboard">' not in page  # compare only
    assert external_references(page) == []
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # plots and thumbnails inline; the training history has one point per epoch
    inline = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    mistakes = page.count("<figure>")
    assert len(inline) == 3 + mistakes and mistakes == min(MAX_MISTAKES, round((1 - summary["accuracy"]) * 24))
    assert sorted(p.name for p in tmp_path.glob("probe-*.png")) == sorted(
        f"probe-{k}.png" for k in ("confusion", "per-class", "curves")
    )
    for path in summary["png"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200


def test_report_without_data_shows_the_recorded_history(probe, tmp_path):
    html = tmp_path / "history.html"
    result = runner.invoke(app, ["report", str(probe), "-o", str(html)])
    assert result.exit_code == 0, result.output
    page = html.read_text()
    assert all(f'<section id="{k}">' in page for k in ("confusion", "per-class", "curves", "mistakes"))
    assert page.count("data:image/png") == 1  # the curves: nothing else without labelled data
    assert "Give a labelled folder" in page


def test_report_never_overwrites_and_checks_before_work(probe, dataset, tmp_path):
    html = tmp_path / "kept.html"
    html.write_text("mine")
    result = runner.invoke(app, ["report", str(probe), str(dataset), "-o", str(html)])
    assert result.exit_code == 2 and "report file already exists" in result.stderr
    assert html.read_text() == "mine"
    png = tmp_path / "fresh-confusion.png"
    png.write_bytes(b"mine")
    result = runner.invoke(app, ["report", str(probe), str(dataset), "-o", str(tmp_path / "fresh.html"), "--png"])
    assert result.exit_code == 2 and "plot file already exists" in result.stderr
    assert png.read_bytes() == b"mine" and not (tmp_path / "fresh.html").exists()
    missing = runner.invoke(app, ["report", str(probe), str(tmp_path / "nope"), "-o", str(tmp_path / "x.html")])
    assert missing.exit_code == 2 and "not found" in missing.stderr


def test_compare_report_has_every_section_inline(compare_report):
    page = compare_report.read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in page, key
    assert external_references(page) == []
    assert "linear-probe" in page and "zeroshot" in page
    for key in PNG_SECTIONS:
        assert compare_report.with_name(f"r-{key}.png").exists()


# ------------------------------------------------------------------------------------------ browser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found:
        return found
    if os.environ.get("CI") == "true":  # .ci/run installs it: in CI a missing browser is a failure
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium before make test)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")


def run_chromium(*args: str, home: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Headless and offline (every host resolves nowhere). Returns the run and the URLs the page asked
    the network for, from Chromium's own NetLog: requests made on behalf of a file:// page carry its
    origin in their network isolation key; the browser's background requests do not."""
    netlog = home / "netlog.json"
    command = [
        chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        "--disable-extensions", "--disable-background-networking", "--disable-component-update",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={home / 'profile'}",
        f"--log-net-log={netlog}", *args,
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)})
    assert netlog.exists(), run.stderr[-2000:]
    requested = set()
    for event in json.loads(netlog.read_text()).get("events", []):
        params = event.get("params") or {}
        if "url" in params and str(params.get("network_isolation_key", "")).startswith("file://"):
            requested.add(params["url"])
    netlog.unlink()
    return run, sorted(requested)


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(compare_report, tmp_path):
    url = compare_report.resolve().as_uri()
    shot = tmp_path / "shot.png"
    rendered, requested = run_chromium(f"--screenshot={shot}", "--window-size=1200,3600", url, home=tmp_path)
    assert shot.exists(), rendered.stderr[-2000:]
    with Image.open(shot) as image:
        gray = image.convert("L")
        assert gray.size == (1200, 3600)
        assert ImageStat.Stat(gray).stddev[0] > 20  # a blank page is one colour: stddev 0
        inked = sum(gray.histogram()[:200]) / (gray.width * gray.height)
        assert inked > 0.05, inked  # text, plots and thumbnails cover part of the page
    assert requested == []

    dom, requested = run_chromium("--dump-dom", "--virtual-time-budget=2000", url, home=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for key in SECTIONS:  # every section reached the rendered DOM, with its heading
        assert re.search(rf'<section id="{key}">\s*<h2>[^<]+</h2>', dom.stdout), key
    assert dom.stdout.count("<img") >= len(SECTIONS) - 1
    assert requested == []


def test_the_browser_checks_see_a_page_that_fetches(tmp_path):
    """The negative control: the same checks flag a page that asks the network for an image."""
    page = tmp_path / "fetching.html"
    page.write_text('<!DOCTYPE html><html><body><h1>x</h1><img src="http://adaclip.invalid/x.png"></body></html>')
    dom, requested = run_chromium("--dump-dom", "--virtual-time-budget=2000", page.as_uri(), home=tmp_path)
    assert external_references(page.read_text())
    assert requested == ["http://adaclip.invalid/x.png"], dom.stderr[-2000:]
