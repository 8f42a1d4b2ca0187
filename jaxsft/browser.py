"""Headless Chromium for a local page (the data report): find the browser, dump the DOM, take a screenshot, and
collect what the page logged to its console (errors, failed loads). Chromium is optional; nothing else needs it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def open_page(page: str | Path, *action: str, browser: str | None = None) -> tuple[str, list[str]]:
    """Run headless Chromium on a local page with `action` (`--dump-dom`, `--screenshot=PNG`, ...):
    (its stdout, the page's console messages)."""
    from jaxsft.errors import UserError

    browser = browser or find_chromium()
    if browser is None:
        raise UserError("no Chromium found for the screenshot (apt-get install chromium, or leave out --screenshot)")
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--enable-logging=stderr", "--v=0", *action, Path(page).resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise RuntimeError(f"{browser} exited with status {run.returncode}: {run.stderr[-2000:]}")
    return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def screenshot(page: str | Path, png: str | Path, width: int = 1100, height: int = 1500) -> list[str]:
    """A PNG of the top `width` x `height` pixels of the page; returns the page's console messages."""
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    return open_page(page, f"--screenshot={Path(png).resolve()}", f"--window-size={width},{height}")[1]
