"""`dvc plots show` offline: the repository's HTML template (.dvc/config `plots.html_template`) inlines vega,
vega-lite and vega-embed, so the page loads nothing from a CDN; in a headless Chromium (Debian's `chromium`,
installed by .ci/run) the per-epoch curves of teacher, scratch and distill and the three test confusion matrices
render as SVG or canvas. The same page made with DVC's own template (scripts from a CDN) stays blank there, which
is what the template fixes."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpipe.report.plots import confusion_csv, reliability_csv

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
# The columns the training stages write to plots/<stage>.csv (kdpipe/train/progress.py), two epochs.
CURVES = "epoch,train_loss,val_loss,train_accuracy,val_accuracy\n1,1.2,1.1,0.5,0.55\n2,0.6,0.7,0.8,0.78\n"


def plots_page(root: Path, offline_template: bool) -> Path:
    """`dvc plots show` in a fresh DVC workspace with dvc.yaml's top-level plots over small curves for every stage
    they name, and the repo's .dvc/config and template when `offline_template` (else DVC's default page)."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([DVC, "init", "-q", "--no-scm"], cwd=root, check=True)
    if offline_template:
        shutil.copy2(REPO / ".dvc/config", root / ".dvc/config")
        shutil.copytree(REPO / ".dvc/offline_plots", root / ".dvc/offline_plots")
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    (root / "plots").mkdir()
    for stage in ("teacher", "scratch", "distill"):
        (root / f"plots/{stage}.csv").write_text(CURVES)
    for label in ("teacher", "scratch", "distilled"):  # as the evaluate stage writes them
        confusion_csv([[3, 1], [0, 4]], ["cat", "dog, small"], root / f"reports/evaluate/confusion_{label}.csv")
        bins = [{"confidence": c, "accuracy": a, "count": 5} for c, a in ((0.55, 0.4), (0.85, 0.8), (0.97, 1.0))]
        reliability_csv(bins, root / f"reports/evaluate/reliability_{label}.csv")
    out = subprocess.run([DVC, "plots", "show", "-o", "out"], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return root / "out/index.html"


def drawn_offline(page: Path, profile: Path) -> list[str]:
    """The <svg>/<canvas> elements in `page`'s DOM after headless Chromium ran its scripts with every network
    request refused (a proxy on a closed port)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's, and fails if this skips)")
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--proxy-server=127.0.0.1:9",
         "--proxy-bypass-list=<-loopback>", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "<body" in out.stdout, out.stdout[:2000]  # a DOM was dumped: an empty list below means "blank"
    return re.findall(r"<(svg|canvas)\b", out.stdout)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    return plots_page(tmp_path_factory.mktemp("plots"), offline_template=True)


def test_the_configured_template_inlines_vega_and_loads_nothing_remote(page):
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc/config")
    assert config["plots"]["html_template"] == "offline_plots/template.html"
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=", html) and "cdn.jsdelivr" not in html
    assert "vegaEmbed(" in html and "teacher accuracy" in html and "scratch vs distilled" in html
    assert "distilled confusion matrix (test)" in html and "dog, small" in html and "reliability (test)" in html
    for package in ("vega", "vega-lite", "vega-embed"):
        assert (REPO / f".dvc/offline_plots/LICENSE.{package}").read_text().strip()


def test_the_page_renders_every_plot_offline_in_headless_chromium(page, tmp_path):
    n_plots = len(yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"])
    assert len(drawn_offline(page, tmp_path / "profile")) >= n_plots


def test_dvcs_default_page_stays_blank_offline(tmp_path):
    """The control: without the template, DVC's page loads vega from a CDN, and offline nothing is drawn."""
    default = plots_page(tmp_path / "default", offline_template=False)
    assert re.search(r"<script[^>]+src=\"https://", default.read_text())
    assert drawn_offline(default, tmp_path / "profile") == []
