"""Screenshot the MLflow UI's registered-model page with headless Chromium.

Starts a local ``mlflow ui`` against a tracking store, waits until it answers,
takes a PNG of ``#/models/<NAME>`` (version table with aliases), then stops
the server.

Needs a Chromium binary on PATH (Debian: ``apt-get install chromium``).

Example::

    .venv/bin/python benchmarks/mlflow_screenshot.py --model bertshrink-classifier
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "headless_shell")
SERVER_TIMEOUT_S = 90.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                   help="backend store URI for mlflow ui")
    p.add_argument("--out", default="reports/mlflow_model_page.png",
                   help="output PNG path")
    p.add_argument("--port", type=int, default=5055, help="mlflow ui port")
    p.add_argument("--wait", type=float, default=15.0,
                   help="seconds of (virtual) time Chromium lets the page render")
    p.add_argument("--window-size", default="1600,2900",
                   help="browser window size WIDTH,HEIGHT")
    return p.parse_args(argv)


def find_browser() -> str:
    """Return the path of a Chromium-like binary, or exit with a hint."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("error: no Chromium found (tried %s); install it with "
             "`apt-get install chromium`" % ", ".join(BROWSERS))


def start_server(tracking_uri: str, port: int) -> subprocess.Popen:
    """Start ``mlflow ui`` on 127.0.0.1:PORT in its own process group."""
    cmd = [sys.executable, "-m", "mlflow", "ui",
           "--backend-store-uri", tracking_uri,
           "--port", str(port), "--host", "127.0.0.1"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def wait_for_server(proc: subprocess.Popen, url: str,
                    timeout: float = SERVER_TIMEOUT_S) -> None:
    """Poll URL until it answers; raise RuntimeError on exit or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"mlflow ui exited with code {proc.returncode}:\n"
                               f"{err[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status < 500:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"mlflow ui did not answer at {url} within {timeout:.0f} s "
                       "(port busy? wrong --tracking-uri?)")


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate the mlflow ui process group (gunicorn/uvicorn workers too)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    except ProcessLookupError:
        pass


def check_model(port: int, model: str) -> None:
    """Raise RuntimeError if MODEL is not registered in the served store."""
    query = urllib.parse.urlencode({"name": model})
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?{query}"
    try:
        with urllib.request.urlopen(url, timeout=30):
            return
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"registered model {model!r} not found in the store "
                           f"(HTTP {exc.code}); check --model / --tracking-uri") from exc


def model_url(port: int, model: str) -> str:
    """Return the UI URL of a registered model's page."""
    return f"http://127.0.0.1:{port}/#/models/{urllib.parse.quote(model, safe='')}"


def screenshot(browser: str, url: str, out: Path, wait_s: float,
               window_size: str) -> None:
    """Render URL with headless Chromium and write a PNG to OUT."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--hide-scrollbars",
               "--no-first-run", "--no-default-browser-check",
               f"--user-data-dir={profile}",
               f"--window-size={window_size}",
               f"--virtual-time-budget={int(wait_s * 1000)}",
               f"--screenshot={out.resolve()}", url]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium failed ({res.returncode}):\n{res.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> None:
    """Start mlflow ui, screenshot the model page, stop the server."""
    args = parse_args(argv)
    browser = find_browser()
    out = Path(args.out)
    proc = start_server(args.tracking_uri, args.port)
    try:
        wait_for_server(proc, f"http://127.0.0.1:{args.port}/")
        check_model(args.port, args.model)
        url = model_url(args.port, args.model)
        screenshot(browser, url, out, args.wait, args.window_size)
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    finally:
        stop_server(proc)
    print(f"wrote {out} ({url})")


if __name__ == "__main__":
    main()
