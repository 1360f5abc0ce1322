"""The web UI in a real browser (Debian's chromium, headless, driven by selenium through chromedriver),
against `vigil up` on a fresh home - what a newcomer runs - with the real detector model: log in, see
the astronaut photo's event with its thumbnail, open it and see the annotated snapshot and its boxes,
mark it reviewed and see that survive a reload, filter by camera, stop and start a service from the
Services page and watch its verdict change, watch live log lines arrive, retry a dead letter. Every
step takes a screenshot, and each is checked not to be blank."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.cli.stack import free_port
from tests.support import REPO, drop, find_models_dir, photo_bytes, wait_until

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and DRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (tests/system-packages.sh installs them as root)",
)


@pytest.fixture
def up(tmp_path):
    models = find_models_dir()
    if models is None:
        pytest.skip("yolox_nano.onnx not found: the astronaut needs the real model (set VIGIL_MODELS_DIR)")
    home, out = tmp_path / "home", tmp_path / "up.log"
    ports = {name: free_port() for name in ("nats", "pg", "web", "health")}
    env = {
        **os.environ,
        "VIGIL_MODELS_DIR": str(models),
        "VIGIL_AGGREGATOR__IDLE_SECONDS": "2",  # events close two seconds after their last photo
        "VIGIL_HEARTBEAT_SECONDS": "1",
        "VIGIL_HEALTH__CHECK_SECONDS": "1",
    }
    argv = [sys.executable, "-m", "services.cli.main", "up", "--home", str(home)]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    with open(out, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        wait_until(lambda: "Ctrl-C stops everything" in out.read_text(), timeout=90, what="vigil up's banner")
        banner = out.read_text()
        password = (home / "web-password.txt").read_text().strip()
        assert f"http://127.0.0.1:{ports['web']}/" in banner and f"password {password}" in banner
        assert "model: yolox-nano" in banner
        wait_until(lambda: '"event": "serving"' in (home / "logs" / "web.log").read_text(), what="the web UI serving")
        yield {"home": home, "url": f"http://127.0.0.1:{ports['web']}", "password": password, "log": out}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}",
    ):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


class Shots:
    def __init__(self, driver, folder: Path) -> None:
        self.driver, self.folder = driver, folder
        folder.mkdir(exist_ok=True)

    def take(self, name: str) -> Path:
        path = self.folder / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), name
        img = cv2.imread(str(path))
        # not blank: a page with text and pictures has many distinct grey levels and real contrast
        assert img is not None and img.std() > 20 and len(np.unique(img.reshape(-1, 3)[::97], axis=0)) > 20, name
        return path


def until(driver, condition, what: str, timeout: float = 60):
    return wait_until(lambda: _safely(condition, driver), timeout=timeout, interval=0.3, what=what)


def _safely(condition, driver):
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        return condition(driver)
    except (StaleElementReferenceException, WebDriverException):
        return None


def control(home: Path, action: str, service: str) -> str:
    """Ask `vigil up`'s supervisor directly, as the Services page does (services/web/control.py)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(home / "state" / "up.sock"))
        s.sendall(json.dumps({"action": action, "service": service}).encode() + b"\n")
        return json.loads(s.makefile().readline())["result"]


def test_an_operator_reviews_an_event_and_runs_the_services(up, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d, url, shots = browser, up["url"], Shots(browser, tmp_path / "shots")
    drop(up["home"] / "media" / "front_door" / "astronaut.jpg", photo_bytes("astronaut"))

    # log in (the page asked for goes to the login first, and back after it)
    d.get(f"{url}/events")
    assert "/login" in d.current_url
    d.find_element(By.NAME, "username").send_keys("admin")
    d.find_element(By.NAME, "password").send_keys(up["password"])
    d.find_element(By.ID, "login").click()
    until(d, lambda d: d.current_url.endswith("/events"), "the events page after login")

    # the astronaut's event appears with its thumbnail (the list polls every 5 s: no reload)
    thumb = until(
        d,
        lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "img.thumb") if d.execute_script("return arguments[0].naturalWidth", i) > 0],
        "the event's thumbnail",
        timeout=120,
    )[0]  # fmt: skip
    assert d.execute_script("return arguments[0].naturalWidth", thumb) == 320
    shots.take("1-events")
    thumb.click()

    # the event: the annotated snapshot at the photo's own size, and its boxes (a person)
    snap = until(d, lambda d: d.find_element(By.ID, "snapshot"), "the snapshot")
    until(d, lambda d: d.execute_script("return arguments[0].naturalWidth", snap) == 512, "the snapshot loaded")
    assert "person" in d.find_element(By.TAG_NAME, "main").text
    assert d.find_element(By.ID, "reviewed-state").text == "Not reviewed"
    shots.take("2-event")
    d.find_element(By.ID, "toggle-reviewed").click()
    until(d, lambda d: d.find_element(By.ID, "reviewed-state").text == "Reviewed", "reviewed")
    d.refresh()
    assert d.find_element(By.ID, "reviewed-state").text == "Reviewed"  # it was stored, not just shown

    # filter by camera
    d.get(f"{url}/events")
    Select(d.find_element(By.NAME, "camera")).select_by_visible_text("front_door")
    d.find_element(By.ID, "filter").click()
    until(
        d, lambda d: "camera=front_door" in d.current_url and d.find_elements(By.CSS_SELECTOR, "img.thumb"), "filtered"
    )
    d.get(f"{url}/events?camera=backyard")
    assert d.find_elements(By.CSS_SELECTOR, "img.thumb") == [] and "No events match" in d.page_source
    shots.take("3-filtered")

    # the Services page: stop retention, watch its verdict go, start it, watch it come back
    d.get(f"{url}/services")

    def verdict(d):
        return d.find_element(By.CSS_SELECTOR, 'tr[data-service="retention"] td.verdict').text

    until(d, lambda d: verdict(d) == "healthy", "retention healthy")
    d.find_element(By.CSS_SELECTOR, 'tr[data-service="retention"] button[data-action="stop"]').click()
    until(d, lambda d: "stop vigil-retention.service: ok" in d.find_element(By.CLASS_NAME, "flash").text, "stopped")
    until(d, lambda d: verdict(d) in ("down", "stale"), "retention's verdict after the stop", timeout=30)
    shots.take("4-services-stopped")
    d.find_element(By.CSS_SELECTOR, 'tr[data-service="retention"] button[data-action="start"]').click()
    until(d, lambda d: verdict(d) == "healthy", "retention healthy again", timeout=60)

    # live logs: the page shows the tail, and a new line arrives without a reload
    d.get(f"{url}/services/vigil-retention.service/logs")
    until(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log tr")) > 2, "the log's tail")
    seen = len(d.find_elements(By.CSS_SELECTOR, "#log tr"))
    assert control(up["home"], "restart", "retention") == "ok"
    until(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log tr")) > seen, "a new log line, live")
    assert "ready" in d.find_element(By.ID, "log").text
    shots.take("5-logs")

    # a corrupt photo's dead letter, retried from the page
    drop(up["home"] / "media" / "front_door" / "broken.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 64 + b"\xff\xd9")
    d.get(f"{url}/dead-letters")
    until(d, lambda d: d.refresh() or "front_door/broken.jpg" in d.page_source, "the dead letter", timeout=60)
    shots.take("6-dead-letters")
    d.find_element(By.CSS_SELECTOR, "button[data-retry]").click()
    until(d, lambda d: "is back on vigil.uploads.front_door" in d.page_source, "the retry")

    # every action is in the audit trail
    d.get(f"{url}/audit")
    text = d.find_element(By.ID, "audit").text
    for action in ("login", "reviewed", "stop", "start", "retry"):
        assert re.search(rf"\b{action}\b", text), (action, text)
    shots.take("7-audit")
    if os.environ.get("VIGIL_SCREENSHOTS"):  # `VIGIL_SCREENSHOTS=docs just test tests/browser`: the README's
        for p in (tmp_path / "shots").iterdir():
            shutil.copy(p, Path(os.environ["VIGIL_SCREENSHOTS"]) / f"web-{p.name}")
