"""`persam app` in a real browser: headless Chromium driven by Selenium.

The test starts ``persam app`` on 127.0.0.1 (a free port) with a random vit_t checkpoint, then
does what a user does: adds a reference photo, clicks on the object and sees SAM's mask, undoes
it and uploads the mask instead, adds two shared photos as targets, runs, sees two results with
their scores, opens one at full size, opens a heat map, downloads the zip and checks its files.
It also checks that a bad file gives a visible message, that nothing was fetched from anywhere
but the app, that another browser session sees none of it, and that the page says when its
session has ended.  Screenshots go to the test's tmp folder; with
PERSAM_UPDATE_DOCS=1 the results screenshot also goes to docs/app.png (for README.md).

Needs Debian's ``chromium`` and ``chromium-driver`` (installed by .ci/run) and the
``[app]`` and ``[test]`` extras; it is skipped, saying why, where they are missing.
PERSAM_APP_CHECKPOINT=FILE runs it with real weights instead (e.g. for the docs screenshot).
"""

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the app extra is not installed: pip install -e '.[app]'")
pytest.importorskip("uvicorn", reason="the app extra is not installed: pip install -e '.[app]'")
pytest.importorskip("multipart", reason="python-multipart (the app extra) is not installed")
pytest.importorskip("selenium", reason="selenium (the test extra) is not installed")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOCS_SCREENSHOT = REPO / "docs" / "app.png"


from browser_testing import CHROMEDRIVER, CHROMIUM, skip_module_without_browser  # noqa: E402

skip_module_without_browser()


# --------------------------------------------------------------------------------------------
# the app and the browser


@pytest.fixture
def app_url(random_vit_t_checkpoint):
    """`persam app` in a subprocess on a free port of 127.0.0.1; stopped with Ctrl-C (SIGINT)."""
    checkpoint = os.environ.get("PERSAM_APP_CHECKPOINT") or str(random_vit_t_checkpoint)
    env = dict(os.environ, PERSAM_BACKEND=os.environ.get("PERSAM_BACKEND", "torch"), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "persam", "app", "--model", "vit_t", "--checkpoint", checkpoint,
               "--host", "127.0.0.1", "--port", "0", "-q"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    log = []

    def read() -> None:
        for line in process.stderr:
            log.append(line)
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    url, deadline = None, time.monotonic() + 180
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line.startswith("persam app: http://"):
            url = line.split()[2]
    if url is None:
        process.kill()
        pytest.fail("persam app did not start:\n" + "".join(log))
    yield url
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("persam app did not stop on Ctrl-C")
    text = "".join(log)
    assert "Traceback" not in text and code == 0, text


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-extensions", "--disable-default-apps", "--mute-audio",
                     "--window-size=1360,1080", "--force-device-scale-factor=1",
                     f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.fail(f"{CHROMIUM} with {CHROMEDRIVER} did not start: {exc.msg}")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(what, condition, timeout: float = 120.0, driver=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except WebDriverException:
            value = None
        if value:
            return value
        time.sleep(0.1)
    shown = f"; the page says: {driver.find_element(By.ID, 'message').text!r}" if driver is not None else ""
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}{shown}")


def _idle(driver) -> bool:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-pending") in ("0", None)


def _message(driver):
    box = driver.find_element(By.ID, "message")
    return (box.get_attribute("data-kind"), box.text) if box.is_displayed() else (None, "")


def _click_on(driver, canvas, x: float, y: float, width: int, height: int) -> None:
    """Click the canvas at image pixel (x, y) of a width x height image."""
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(driver).move_to_element_with_offset(canvas, x / width * w - w / 2, y / height * h - h / 2).click().perform()


def _candidate_clicks(mask: np.ndarray):
    """Points on the object: its centre first, then a grid over it, nearest the centre first."""
    ys, xs = np.nonzero(mask)
    centre = (float(xs.mean()), float(ys.mean()))
    grid = [(float(x), float(y)) for y in np.linspace(ys.min(), ys.max(), 7)[1:-1]
            for x in np.linspace(xs.min(), xs.max(), 7)[1:-1] if mask[int(y), int(x)]]
    grid.sort(key=lambda p: (p[0] - centre[0]) ** 2 + (p[1] - centre[1]) ** 2)
    return [centre] + grid


def _save_docs_screenshot(png: bytes) -> None:
    """docs/app.png under 300 KB: the screenshot in 256 colours."""
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
    for colours in (256, 128, 64):
        buffer = io.BytesIO()
        picture.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buffer, format="PNG", optimize=True)
        if buffer.tell() < 300_000:
            break
    DOCS_SCREENSHOT.write_bytes(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# the test


def test_click_run_and_download_in_a_real_browser(app_url, browser, perseg_dir, tmp_path):
    driver = browser
    shots = tmp_path / "screenshots"
    shots.mkdir()
    cat = perseg_dir / "Images" / "cat"
    mask_file = perseg_dir / "Annotations" / "cat" / "00.png"
    reference_mask = np.asarray(Image.open(mask_file).convert("L")) > 0
    height, width = reference_mask.shape

    driver.get(app_url)
    _wait("the page to load its state", lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert driver.title.startswith("persam")
    assert "vit_t" in driver.find_element(By.ID, "model").text

    # 1. the reference: encoded once, then a click gives SAM's mask
    driver.find_element(By.ID, "ref-file").send_keys(str(cat / "00.jpg"))
    info = driver.find_element(By.ID, "ref-info")
    _wait("the reference to be encoded", lambda: f"{width}×{height}" in info.text and _idle(driver), driver=driver)
    assert "No mask yet" in info.text
    canvas = driver.find_element(By.ID, "ref-canvas")
    assert canvas.is_displayed()
    tried = []
    for x, y in _candidate_clicks(reference_mask)[:12]:  # random weights: SAM may find nothing at a point
        started = time.perf_counter()
        _click_on(driver, canvas, x, y, width, height)
        _wait("the click's mask", lambda: _idle(driver), driver=driver)
        tried.append(round(time.perf_counter() - started, 3))
        if int(info.get_attribute("data-area") or 0) > 0:
            break
        kind, text = _message(driver)
        assert kind == "error" and "SAM found no object" in text, text  # said on the page
    else:
        pytest.fail(f"no click on the object gave a mask ({len(tried)} tried)")
    assert "Mask:" in info.text and "from your clicks" in info.text
    print(f"click -> mask in the browser: {tried[-1]:.3f} s ({len(tried)} click(s))")
    driver.save_screenshot(str(shots / "1-clicked.png"))

    # undo takes the click back; a dragged box is a prompt too
    driver.find_element(By.ID, "undo").click()
    _wait("undo", lambda: _idle(driver) and "No mask yet" in info.text, driver=driver)
    ys, xs = np.nonzero(reference_mask)
    w, h = canvas.size["width"], canvas.size["height"]
    corner = (xs.min() / width * w - w / 2, ys.min() / height * h - h / 2)
    ActionChains(driver).move_to_element_with_offset(canvas, *corner).click_and_hold().move_by_offset(
        (xs.max() - xs.min()) / width * w / 2, (ys.max() - ys.min()) / height * h / 2).move_by_offset(
        (xs.max() - xs.min()) / width * w / 2, (ys.max() - ys.min()) / height * h / 2).release().perform()
    _wait("the box's mask", lambda: _idle(driver), driver=driver)
    if int(info.get_attribute("data-area") or 0) > 0:
        assert "from your box" in info.text
    else:
        assert "SAM found no object at these box" in _message(driver)[1]
    driver.find_element(By.ID, "clear").click()
    _wait("clear", lambda: _idle(driver) and "No mask yet" in info.text, driver=driver)

    # the mask uploaded instead is the one learned from
    driver.find_element(By.ID, "mask-file").send_keys(str(mask_file))
    _wait("the uploaded mask", lambda: _idle(driver) and "from the uploaded mask" in info.text, driver=driver)
    assert int(info.get_attribute("data-area")) == int(reference_mask.sum())

    # 2. a file that is not an image gives a visible message, and nothing else changes
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    driver.find_element(By.ID, "target-files").send_keys(str(notes))
    _wait("the message about the bad file", lambda: _idle(driver) and _message(driver)[0] == "error", driver=driver)
    assert "notes.txt: not a readable image" in _message(driver)[1]
    assert not driver.find_elements(By.CSS_SELECTOR, ".card")

    # 3. two targets, run, two results with their scores
    driver.find_element(By.ID, "target-files").send_keys(f"{cat / '01.jpg'}\n{cat / '02.jpg'}")
    _wait("two target cards", lambda: len(driver.find_elements(By.CSS_SELECTOR, ".card")) == 2 and _idle(driver))
    started = time.perf_counter()
    driver.find_element(By.ID, "run").click()
    progress = driver.find_element(By.ID, "progress-text")
    _wait("the run to finish", lambda: "Done: 2 / 2" in progress.text, timeout=300, driver=driver)
    run_s = time.perf_counter() - started
    cards = driver.find_elements(By.CSS_SELECTOR, ".card")
    assert [c.find_element(By.CSS_SELECTOR, ".name").text for c in cards] == ["01.jpg", "02.jpg"]
    timings = []
    for c in cards:
        assert c.get_attribute("data-status") in ("found", "not-found")
        status = c.find_element(By.CSS_SELECTOR, ".status").text
        assert status.startswith("found") or status.startswith("not found")
        peak = c.find_element(By.CSS_SELECTOR, ".peak").text
        assert peak.startswith("peak similarity ") and -1 <= float(peak.split()[-1]) <= 1
        iou = c.find_element(By.CSS_SELECTOR, ".iou").text
        assert iou.startswith("predicted IoU ") and 0 <= float(iou.split()[-1]) <= 1.5
        timing = c.find_element(By.CSS_SELECTOR, ".timing").text
        assert timing.startswith("encoded in ")
        timings.append(timing)
        picture = c.find_element(By.CSS_SELECTOR, ".picture")
        assert "/overlay.jpg" in picture.get_attribute("src")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture) > 0
    print(f"run of 2 targets in the browser: {run_s:.2f} s ({'; '.join(timings)})")
    assert "2 targets" in driver.find_element(By.ID, "summary").text
    png = driver.get_screenshot_as_png()
    (shots / "2-results.png").write_bytes(png)
    if os.environ.get("PERSAM_UPDATE_DOCS") == "1":
        _save_docs_screenshot(png)

    # a click on a result opens it at full size (the overlay at the photo's own size)
    first = cards[0]
    small = first.find_element(By.CSS_SELECTOR, ".picture")
    small.click()
    viewer = driver.find_element(By.ID, "viewer")
    full = driver.find_element(By.ID, "viewer-image")
    _wait("the full-size result", lambda: viewer.get_attribute("open") is not None and driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", full) > 0, driver=driver)
    natural = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", full)
    assert natural == list(Image.open(cat / "01.jpg").size), natural
    assert "/full.jpg" in full.get_attribute("src") and full.size["width"] > 2 * small.size["width"]
    driver.save_screenshot(str(shots / "2b-full-size.png"))
    full.click()  # closes it
    _wait("the viewer to close", lambda: viewer.get_attribute("open") is None, driver=driver)

    # a heat map on demand (no encoding: the embedding is cached)
    first.find_element(By.CSS_SELECTOR, ".heatmap").click()
    heat = first.find_element(By.CSS_SELECTOR, ".picture")
    _wait("the heat map", lambda: "similarity.png" in heat.get_attribute("src")
          and driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heat) > 0)
    driver.save_screenshot(str(shots / "3-heatmap.png"))

    # 4. the zip: masks, overlays, results.json, the concept
    driver.find_element(By.ID, "download-zip").click()
    archive_path = driver.downloads / "persam-results.zip"
    _wait("the zip download", lambda: archive_path.is_file() and not list(driver.downloads.glob("*.crdownload")),
          driver=driver)
    _wait("the download message", lambda: "Downloaded the zip" in _message(driver)[1], driver=driver)
    with zipfile.ZipFile(archive_path) as archive:
        names = set(archive.namelist())
        assert {"results.json", "01.png", "01_overlay.jpg", "02.png", "02_overlay.jpg", "reference.concept",
                "reference_mask.png"} <= names, names
        results = json.loads(archive.read("results.json"))
        assert results["format"] == "persam-results" and results["summary"]["segmented"] == 2
        assert [(r["image"], r["status"]) for r in results["images"]] == [("01.jpg", "ok"), ("02.jpg", "ok")]
        for record in results["images"]:
            mask = Image.open(io.BytesIO(archive.read(record["outputs"]["mask"])))
            assert list(mask.size) == record["size"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(archive.read("reference_mask.png")))) > 0, reference_mask)
    driver.save_screenshot(str(shots / "4-downloaded.png"))

    # nothing came from anywhere but the app
    origin = app_url.rstrip("/")
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => [e.name, e.duration])")
    assert fetched and all(u.startswith(origin) or u.startswith(("data:", "blob:")) for u, _ in fetched), fetched
    for what, part in (("click -> mask", "/prompts"), ("segment a target", "/segment"), ("zip", "results.zip")):
        times = [f"{d / 1000:.2f}" for u, d in fetched if part in u]
        print(f"browser request times, {what} (s): {', '.join(times)}")

    # 5. another browser session (no cookie) sees none of it
    overlay_url = cards[1].find_element(By.CSS_SELECTOR, ".picture").get_attribute("src")
    driver.delete_all_cookies()
    driver.get(app_url)
    _wait("a fresh page", lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert not driver.find_elements(By.CSS_SELECTOR, ".card") and not driver.find_elements(By.CSS_SELECTOR, ".thumb")
    status = driver.execute_script("return fetch(arguments[0]).then(r => r.status)", overlay_url)
    assert status == 404
    driver.save_screenshot(str(shots / "5-new-session.png"))

    # a session that has ended: the page says so
    driver.add_cookie({"name": "persam_session", "value": "a-session-that-ended"})
    driver.get(app_url)
    _wait("the page to say the session ended", lambda: "session on this server has ended" in _message(driver)[1],
          driver=driver)
    print(f"screenshots in {shots}")
