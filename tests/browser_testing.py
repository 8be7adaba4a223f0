"""Headless Chromium for the browser tests (test_app_browser, test_overlay_video_browser)."""

import os
import shutil
from pathlib import Path

import pytest


def _find(names, extra=()):
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return next((str(p) for p in map(Path, extra) if p.is_file()), None)


CHROMIUM = os.environ.get("PERSAM_CHROMIUM") or _find(("chromium", "chromium-browser", "google-chrome"))
CHROMEDRIVER = os.environ.get("PERSAM_CHROMEDRIVER") or _find(("chromedriver",), ("/usr/lib/chromium/chromedriver",))


def skip_module_without_browser() -> None:
    """Skip the calling test module, saying why, where no Chromium and driver are installed."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(f"no headless browser here (chromium: {CHROMIUM or 'not found'}, chromedriver: "
                    f"{CHROMEDRIVER or 'not found'}); as root: apt-get install -y chromium chromium-driver "
                    f"(.ci/run does)", allow_module_level=True)
