"""A real headless browser (Debian's chromium) for tests that must see a page the way a reviewer does.

`ensure_chromium` finds chromium on PATH, installs Debian's package when it is missing and the test runs as root
with apt-get, and otherwise skips, unless GALLERYMATCH_REQUIRE_BROWSER=1 (CI) makes a missing browser a failure.
Pages are opened only as file:// URLs, with chromium's background networking, component updates, sync and
extensions switched off: nothing but loopback may ever be contacted (see ../shared/guide/environment.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome")
REQUIRE_ENV = "GALLERYMATCH_REQUIRE_BROWSER"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT_S = 60
INSTALL_TIMEOUT_S = 600

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--metrics-recording-only",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--no-default-browser-check",
)

_cached: tuple[str | None, str] | None = None  # (path, why it is missing), once per session


def find_chromium() -> str | None:
    """The first of chromium, chromium-browser, google-chrome on PATH (None when there is none)."""
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _apt_install() -> str:
    """Install Debian's chromium non-interactively; '' on success, else why it failed."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]

    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)

    try:
        done = attempt()
        if done.returncode != 0:  # the package lists may be stale or absent: refresh once, then retry
            subprocess.run(
                ["apt-get", "update"], env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
            )
            done = attempt()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install chromium failed: {exc}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return f"apt-get install chromium exited {done.returncode}: {' | '.join(tail)}"
    return ""


def _locate() -> tuple[str | None, str]:
    found = find_chromium()
    if found:
        return found, ""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, "chromium is not on PATH and the tests do not run as root (cannot apt-get install it)"
    if shutil.which("apt-get") is None:
        return None, "chromium is not on PATH and apt-get is not available"
    why = _apt_install()
    found = find_chromium()
    if found:
        return found, ""
    return None, why or "apt-get install chromium succeeded but no chromium is on PATH"


def ensure_chromium() -> str:
    """The path of a chromium binary, installing Debian's package when missing (cached for the session).

    Without one: raises when GALLERYMATCH_REQUIRE_BROWSER=1 (CI), skips the test otherwise.
    """
    global _cached  # noqa: PLW0603 - one look-up (and at most one install) per test session
    if _cached is None:
        _cached = _locate()
    path, why = _cached
    if path:
        return path
    if os.environ.get(REQUIRE_ENV) == "1":
        raise RuntimeError(f"no chromium browser ({REQUIRE_ENV}=1 forbids skipping): {why}")
    pytest.skip(
        f"no chromium browser: {why} (install Debian's chromium; CI sets {REQUIRE_ENV}=1 so it cannot skip there)"
    )


def _file_url(html_path: Path) -> str:
    return html_path.resolve().as_uri()


def _run(args: list[str], timeout_s: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    binary = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="gm-chromium-") as profile:
        command = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def dump_dom(html_path: Path, width: int = 1280, height: int = 900, scale: float = 1.0) -> str:
    """The DOM chromium serialises after loading `html_path` (file:// only) and running its scripts."""
    url = _file_url(html_path)
    assert url.startswith("file://"), url
    done = _run(
        [
            f"--window-size={width},{height}",
            f"--force-device-scale-factor={scale}",
            "--virtual-time-budget=5000",
            "--run-all-compositor-stages-before-draw",
            "--dump-dom",
            url,
        ]
    )
    return done.stdout


def screenshot(html_path: Path, png_path: Path, width: int = 1280, height: int = 2400, scale: float = 1.0) -> Path:
    """A PNG of the page's first `width` x `height` CSS pixels at device scale `scale` (2 emulates 200% zoom)."""
    url = _file_url(html_path)
    assert url.startswith("file://"), url
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    _run(
        [
            f"--window-size={width},{height}",
            f"--force-device-scale-factor={scale}",
            "--virtual-time-budget=5000",
            "--run-all-compositor-stages-before-draw",
            f"--screenshot={png_path.resolve()}",
            url,
        ]
    )
    data = png_path.read_bytes() if png_path.exists() else b""
    assert data.startswith(PNG_MAGIC), f"chromium wrote no valid PNG at {png_path}"
    return png_path
