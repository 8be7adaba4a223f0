"""The overlay video of `persam track` plays in a browser: headless Chromium loads it in a <video>.

`persam track` runs on four car-shadow frames at an odd size (213 x 119: H.264 and VP9 need even
sides) with random vit_t weights, then the page next to the overlay loads it muted, calls play()
and waits for the first of: a media error, the playback clock moving, 30 s.  Playing means no
media error, readyState >= 2 (HAVE_CURRENT_DATA), a duration > 0 and currentTime advancing.  Both
the H.264 overlay.mp4 (PyAV) and the fallback overlay.webm (VP9 through OpenCV, as where PyAV is
missing) are played, and the MPEG-4 part 2 file OpenCV's `mp4v` writes (what `persam track` wrote
before) is checked to be refused, so that the check is seen to tell.

Needs Debian's ``chromium`` and ``chromium-driver`` (installed by .ci/run) and selenium (the
``[test]`` extra); it is skipped, saying why, where they are missing.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest

from cli_testing import model_args, run_cli, strict_json
from conftest import DAVIS
from persam.data.io import load_image, load_label_map

pytest.importorskip("selenium", reason="selenium (the test extra) is not installed")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402


from browser_testing import CHROMEDRIVER, CHROMIUM, skip_module_without_browser  # noqa: E402

skip_module_without_browser()

FRAMES = DAVIS / "JPEGImages" / "480p" / "car-shadow"
ANNOTATION = DAVIS / "Annotations" / "480p" / "car-shadow" / "00000.png"
SIZE = (213, 119)  # width, height of the frames given to persam track
FPS = 4  # four frames: a one-second video
MEDIA_ERR_SRC_NOT_SUPPORTED = 4

# Loads arguments[0] into the page's <video>; answers with the element's state at the first media
# error, when the playback clock has moved, or after 30 s.
PLAY = """
const done = arguments[arguments.length - 1];
const video = document.getElementById("video");
let answered = false;
function answer(why) {
  if (answered) return;
  answered = true;
  done({why: why, error: video.error ? video.error.code : null, message: video.error ? video.error.message : "",
        readyState: video.readyState, duration: video.duration, currentTime: video.currentTime,
        width: video.videoWidth, height: video.videoHeight});
}
video.addEventListener("error", () => answer("error"));
video.addEventListener("loadeddata", () => {
  video.play().catch((e) => answer("play() refused: " + e));
});
video.addEventListener("timeupdate", () => { if (video.currentTime > 0) answer("playing"); });
video.addEventListener("ended", () => answer("ended"));
setTimeout(() => answer("timeout"), 30000);
video.src = arguments[0];
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("profile")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-extensions", "--mute-audio",
                     "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    except WebDriverException as exc:
        pytest.fail(f"{CHROMIUM} with {CHROMEDRIVER} did not start: {exc.msg}")
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def play(driver, video: Path) -> dict:
    """The <video> element's state once Chromium has played (or refused) `video`, loaded from file://."""
    page = video.parent / "play.html"
    page.write_text('<!doctype html><meta charset="utf-8"><video id="video" muted playsinline preload="auto"></video>\n',
                    encoding="utf-8")
    driver.get(page.as_uri())
    return driver.execute_async_script(PLAY, video.resolve().as_uri())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Four car-shadow frames at SIZE as a folder of PNG frames, and the first annotation's mask at SIZE."""
    if not FRAMES.is_dir():
        pytest.skip(f"shared data not found at {DAVIS}")
    root = tmp_path_factory.mktemp("clip")
    frames = root / "frames"
    frames.mkdir()
    pictures = []
    for i, path in enumerate(sorted(FRAMES.glob("*.jpg"))[:4]):
        picture = cv2.resize(load_image(path), SIZE, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(frames / f"{i:05d}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        pictures.append(picture)
    mask = root / "mask.png"
    cv2.imwrite(str(mask), cv2.resize((load_label_map(ANNOTATION) == 1).astype(np.uint8) * 255, SIZE,
                                      interpolation=cv2.INTER_NEAREST))
    return frames, mask, pictures


@pytest.mark.parametrize("encoder", ["h264", "vp9"], ids=["overlay.mp4-h264", "overlay.webm-vp9-without-pyav"])
def test_track_overlay_plays_in_chromium(encoder, browser, clip, random_vit_t_checkpoint, tmp_path, monkeypatch):
    import persam.data.video_writer

    frames, mask, _ = clip
    if encoder == "vp9":  # as where PyAV is not installed
        monkeypatch.setattr(persam.data.video_writer, "_pyav_h264", lambda: "PyAV (the av package) is not installed")
    out = tmp_path / "out"
    assert run_cli(["track", frames, "--ref-mask", mask, "--fps", FPS, "--out", out,
                    *model_args(random_vit_t_checkpoint)]) == 0
    overlay = strict_json(out / "results.json")["overlay"]
    state = play(browser, out / overlay["file"])
    assert state["error"] is None, state
    assert state["why"] in ("playing", "ended") and state["currentTime"] > 0, state
    assert state["readyState"] >= 2 and state["duration"] == pytest.approx(4 / FPS, abs=0.05), state
    assert (state["width"], state["height"]) == (214, 120), state  # the odd sides made even
    assert overlay["codec"] == encoder and overlay["frames"] == [0, 1, 2, 3]
    assert overlay["file"] == {"h264": "overlay.mp4", "vp9": "overlay.webm"}[encoder]


def test_the_check_sees_chromium_refuse_an_mp4v_video(browser, clip, tmp_path):
    """What `persam track` wrote before: MPEG-4 part 2 in MP4, through OpenCV's `mp4v`."""
    _, _, pictures = clip
    path = tmp_path / "overlay.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (214, 120))
    assert writer.isOpened()
    for picture in pictures:
        writer.write(cv2.cvtColor(cv2.resize(picture, (214, 120)), cv2.COLOR_RGB2BGR))
    writer.release()
    state = play(browser, path)
    assert state["error"] == MEDIA_ERR_SRC_NOT_SUPPORTED and state["currentTime"] == 0, state
