"""Open a local HTML file in headless Debian Chromium (via playwright) and screenshot it.

The test suite installs nothing: `make test` provides chromium. When it is missing the
calling test fails with the reason; set LATENTGUARD_ALLOW_NO_BROWSER=1 to skip instead
(listed in tests/SKIPS.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = "Debian chromium is not installed (run `make test`, which installs it, or `apt-get install chromium`)"
        if os.environ.get("LATENTGUARD_ALLOW_NO_BROWSER") == "1":
            pytest.skip(reason)
        pytest.fail(reason)
    return exe


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 1600) -> str:
    """Render `html` headless, save a full-page PNG, return the page's visible text."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(html.resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(png), full_page=True)
            return page.inner_text("body")
        finally:
            browser.close()


def assert_not_blank(png: Path) -> None:
    """A rendered report has many non-white pixels and real contrast."""
    import matplotlib.image as mpimg

    img = np.asarray(mpimg.imread(png))[..., :3]
    non_white = (img.mean(-1) < 0.9).mean()
    assert img.std() > 0.05, f"screenshot {png} is flat (std {img.std():.3f})"
    assert non_white > 0.02, f"screenshot {png} is nearly blank ({non_white:.1%} non-white pixels)"
