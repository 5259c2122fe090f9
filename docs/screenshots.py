"""Look at the TensorBoard views as a user does: train a small ViT with both callbacks, open the logs in a real
TensorBoard and a headless Chromium, and save a PNG of each tab into ``docs/``.

Steps: a short demo-like fit (``examples/digits.py``'s ViT on scikit-learn's digits, ``RankMonitor`` every
epoch, ``RankCompression`` at half the blocks' parameters, a few seconds on CPU) writes its logs to a
temporary folder; ``tensorboard`` serves them on 127.0.0.1 at a free port; Chromium (the Debian package
``chromium``, installed with apt-get when missing) is driven over the DevTools protocol to the Time Series,
Scalars, Custom Scalars, Images and Text tabs, waits for them to render, and saves
``docs/tensorboard_<tab>.png``.

The browser starts with the settings the README recommends (smoothing 0, outliers not ignored);
``--defaults`` keeps TensorBoard's own defaults instead, to see what a user gets before changing them.

Run::

    .venv/bin/python docs/screenshots.py          # or: make screenshots
    .venv/bin/python docs/screenshots.py --keep   # also keep the logs (printed) to open them yourself
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

# The tabs to capture: (file name, URL fragment, seconds to let it render, viewport height, a setting to
# apply when the README recommends one: Images at actual size, since TensorBoard shrinks figures to its cards).
TABS = [
    ("timeseries", "timeseries", 8, 1300, None),
    ("scalars", "scalars", 6, 1100, None),
    ("custom_scalars", "custom_scalars", 8, 1500, None),
    ("images", "images", 6, 1700, ("tf-image-dashboard", "_actualSize", True)),
    ("text", "text", 5, 1300, None),
]
# Finds an element through the shadow roots of TensorBoard's Polymer dashboards.
DEEP_QUERY = """(selector) => {
  const find = (root) => {
    const hit = root.querySelector(selector);
    if (hit) return hit;
    for (const el of root.querySelectorAll("*")) {
      if (el.shadowRoot) { const inner = find(el.shadowRoot); if (inner) return inner; }
    }
    return null;
  };
  return find(document);
}"""
WIDTH = 1500


# -- the logs -----------------------------------------------------------------------------------
def make_logs(root: Path, epochs: int, finetune_epochs: int) -> Path:
    """A demo-like fit with RankMonitor and RankCompression; returns the run's log folder."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    import lightning_rank as lr
    from digits import DigitsDataModule, DigitsViT

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)
    L.seed_everything(0)
    monitor = lr.RankMonitor()
    compression = lr.RankCompression(compress_at_epoch=epochs, param_budget=0.5, method="whiten", monitor="val_acc",
                                     exclude_modules=["embed", "head"])
    trainer = L.Trainer(
        max_epochs=epochs + finetune_epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(root, name="digits_vit"),
        callbacks=[monitor, compression],
        limit_train_batches=12,
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsViT(dense_epochs=epochs), DigitsDataModule())
    return Path(trainer.log_dir)


# -- TensorBoard ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port), "--reload_interval", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        if process.poll() is not None:
            raise RuntimeError(f"tensorboard exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("tensorboard did not answer within a minute")


# -- Chromium ---------------------------------------------------------------------------------------
def chromium() -> str:
    """The Chromium executable, installed from Debian's package when missing."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    print("Installing the Debian package `chromium` (apt-get) ...", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "chromium"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("chromium")


class Browser:
    """Headless Chromium driven over the DevTools protocol (a websocket, through aiohttp)."""

    def __init__(self, executable: str, profile: Path) -> None:
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={WIDTH},1200", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for line in self.process.stderr:
            match = re.search(r"DevTools listening on ws://([^/]+)/", line)
            if match:
                self.host = match.group(1)
                break
        else:
            raise RuntimeError("Chromium did not start its DevTools endpoint")
        self._id = 0

    async def connect(self) -> None:
        import aiohttp

        with urllib.request.urlopen(f"http://{self.host}/json/list") as response:
            (page,) = [t for t in json.load(response) if t["type"] == "page"][:1]
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def send(self, method: str, **params) -> dict:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=60)
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def screenshot(self, url: str, path: Path, seconds: float, height: int, setting=None) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1,
                        mobile=False)
        await self.send("Page.navigate", url=url)
        await self.wait_for_load()
        if setting is not None:
            element, name, value = setting
            for _ in range(50):  # the dashboard element appears once its plugin has loaded
                found = await self.evaluate(
                    f"(() => {{ const el = ({DEEP_QUERY})({json.dumps(element)}); "
                    f"if (el) el.set({json.dumps(name)}, {json.dumps(value)}); return !!el; }})()"
                )
                if found:
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(seconds)  # charts draw after their data arrive; TensorBoard has no "done" signal
        data = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))

    async def wait_for_load(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.evaluate("document.readyState") == "complete":
                return
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()
        self.process.terminate()
        self.process.wait(timeout=10)


async def capture(url: str, out: Path, defaults: bool, profile: Path) -> list[Path]:
    browser = Browser(chromium(), profile)
    saved = []
    try:
        await browser.connect()
        await browser.send("Page.enable")
        await browser.send("Runtime.enable")
        await browser.send("Page.navigate", url=f"{url}/#timeseries")
        await browser.wait_for_load()
        if not defaults:  # the settings the README recommends, where TensorBoard keeps them
            settings = {"scalarSmoothing": 0, "ignoreOutliers": False}
            await browser.evaluate(
                f"localStorage.setItem('_tb_global_settings', JSON.stringify({json.dumps(settings)}));"
                "localStorage.setItem('_ignoreYOutliers', 'false');"
            )
        for name, fragment, seconds, height, setting in TABS:
            path = out / f"tensorboard_{name}{'_defaults' if defaults else ''}.png"
            hash_params = "" if defaults or fragment not in ("scalars", "custom_scalars") else "&_smoothingWeight=0"
            await browser.screenshot(f"{url}/?{name}#{fragment}{hash_params}", path, seconds, height,
                                     None if defaults else setting)
            saved.append(path)
            print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    finally:
        await browser.close()
    return saved


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go")
    parser.add_argument("--logdir", type=Path, default=None, help="use these logs instead of training")
    parser.add_argument("--epochs", type=int, default=8, help="planned epochs before compression")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--defaults", action="store_true", help="keep TensorBoard's default settings")
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lightning_rank_screens_"))
    try:
        logdir = args.logdir or make_logs(work / "runs", args.epochs, args.finetune_epochs).parent
        tensorboard, url = start_tensorboard(logdir)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            return asyncio.run(capture(url, args.out, args.defaults, work / "profile"))
        finally:
            tensorboard.terminate()
            tensorboard.wait(timeout=10)
    finally:
        if args.keep and args.logdir is None:
            print(f"logs kept in {work / 'runs'}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
