"""The web page (``pipelines/serve/static``) in a real headless Chromium, driven by Selenium.

Issue 11's page tests: load the page, upload an image, run an edit and check the edited image appears at the
input's size; generate an image in session mode, change the prompt and check the new image and the session
figures appear; an API error and a lost session show as readable messages; no test may leave a script error in
the browser's console. The browser is Debian's ``chromium`` with its
``chromium-driver`` (``make test-browser`` installs both); without them, or without Selenium, every test is
skipped with the reason.

Each test runs against two servers: ``fake``, a FastAPI fake of HTTP API v1 in this file (seconds, the page
alone), and ``app`` (``slow``: a local Ray starts), the real app started with ``instdiff serve`` on the tiny
model — or the server at ``INSTDIFF_SERVE_URL`` when that is set. The page talks to the server that serves it;
the browser is kept to 127.0.0.1 (every host name resolves to nothing, background networking is off).
"""

import contextlib
import copy
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from serve_helpers import TINY_ARGS, b64, free_port, png, scene

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]
STATIC = REPO / "pipelines" / "serve" / "static"
WAIT_S = 120.0  # the longest a page action may take (2 shared CPU cores)
APP_START_S = 240.0  # the longest `instdiff serve` may take to answer /healthz (a local Ray starts)
STEPS = 4  # denoising steps the tests ask for through the page


def _require_browser() -> None:
    """Skip the test, saying why, unless Selenium, chromium and chromedriver are all present."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; make test-browser does it)")
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            pytest.skip(f"{path} not found: install Debian's {pkg} (apt-get install -y {pkg}; make test-browser)")


# ---- a fake of the documented HTTP API v1, for the page alone ------------------------------------------------


def _fake_app():
    """A FastAPI app with the page's routes and HTTP API v1's shapes; images are made with PIL, not a model.

    ``POST /v1/edits`` returns the input inverted with the left half as the mask; ``POST /v1/sessions``
    returns a 64×48 gradient; session edits tint the left half. Errors have the API's
    ``{"error": {"code", "message"}}`` form.
    """
    import base64
    import uuid

    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from PIL import ImageOps

    app = FastAPI()
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    sessions: dict[str, dict] = {}

    def encode(img: Image.Image) -> str:
        return b64(png(np.asarray(img)))

    def half_mask(size: tuple[int, int]) -> Image.Image:
        m = Image.new("L", size, 0)
        m.paste(255, (0, 0, size[0] // 2, size[1]))
        return m

    def error(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        methods = ["instdiffedit", "diffedit", "sdedit"]
        return {"name": "fake", "resolution": 64, "defaults": {"steps": 4, "guidance_scale": 7.5}, "methods": methods}

    @app.post("/v1/edits")
    async def edits(request: Request):
        body = await request.json()
        prompt = body.get("target_prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return error(422, "invalid_prompt", "target_prompt: empty; expected a non-empty string")
        raw = body["image"].split("base64,")[-1]
        img = Image.open(io.BytesIO(base64.b64decode(raw))).convert("RGB")
        return {
            "image": encode(ImageOps.invert(img)),
            "mask": encode(half_mask(img.size)),
            "method": body.get("method", "instdiffedit"),
            "seed": body.get("seed", 0),
            "unet_calls": 20,
            "timings": {"encode": 0.01, "denoise": 0.5, "total": 0.6},
            "warnings": [],
            "parameters": body | {"image": "…"},
        }

    @app.post("/v1/sessions")
    async def create(request: Request):
        body = await request.json()
        img = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
        sid = uuid.uuid4().hex
        sessions[sid] = {"image": img, "prompt": body["prompt"]}
        return {"session_id": sid, "image": encode(img), "timings": {"total": 2.0}}

    @app.post("/v1/sessions/{sid}/edits")
    async def session_edit(sid: str, request: Request):
        if sid not in sessions:
            return error(404, "session_not_found", f"session {sid} is unknown or expired; start a new one")
        body = await request.json()
        img = sessions[sid]["image"].copy()
        img.paste((255, 0, 0), (0, 0, 32, 48))
        sessions[sid] = {"image": img, "prompt": body["prompt"]}
        return {
            "session_id": sid,
            "image": encode(img),
            "mask": encode(half_mask(img.size)),
            "active_fraction": 0.5,
            "unet_macs_ratio": 0.55,
            "timings": {"mask": 0.1, "denoise": 0.3, "total": 0.4},
            "seconds": 0.4,
            "regenerate_seconds": 2.0,
            "speedup": 5.0,
            "edits": 1,
        }

    @app.delete("/v1/sessions/{sid}")
    def delete(sid: str):
        sessions.pop(sid, None)
        return {"deleted": sid}

    return app


@contextlib.contextmanager
def _fake_server() -> Iterator[str]:
    """Serve :func:`_fake_app` with uvicorn on a thread at a free 127.0.0.1 port; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_fake_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the fake API server did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _healthy(url: str) -> bool:
    """Whether ``GET url/healthz`` answers 200."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def _real_server(tmp: Path) -> Iterator[str]:
    """Run the real app (``instdiff serve``, its own local Ray) with the Serve tests' tiny-model settings
    (:data:`serve_helpers.TINY_ARGS`) at a free 127.0.0.1 port.

    Waits until ``/healthz`` answers 200 (at most ``APP_START_S``), yields the URL, then stops it with Ctrl-C
    (SIGINT), and kills its process group if it is still there after 60 s.
    """
    spec = yaml.safe_load((REPO / "configs" / "serve" / "default.yaml").read_text())
    spec["applications"][0]["args"] = copy.deepcopy(TINY_ARGS)
    config = tmp / "serve.yaml"
    config.write_text(yaml.safe_dump(spec))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "serve.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)  # always a private local Ray
    env.setdefault("RAY_AUTH_MODE", "disabled")
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--config", str(config), "--host", "127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # a shell without job control starts background jobs with SIGINT ignored; Ctrl-C must work here
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + APP_START_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"instdiff serve did not become healthy within {APP_START_S:g} s; its log:\n{tail}")
            time.sleep(1.0)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module", params=["fake", pytest.param("app", marks=pytest.mark.slow)])
def base_url(request, tmp_path_factory) -> Iterator[str]:
    """The URL of a server with the page and HTTP API v1 on 127.0.0.1, stopped after the module's tests.

    ``fake``: :func:`_fake_app` (seconds; the page alone). ``app`` (slow: a local Ray starts): the real app via
    ``instdiff serve`` on the tiny model, or the server at ``INSTDIFF_SERVE_URL`` when that is set.
    """
    _require_browser()
    if request.param == "fake":
        with _fake_server() as url:
            yield url
    elif os.environ.get("INSTDIFF_SERVE_URL"):
        yield os.environ["INSTDIFF_SERVE_URL"].rstrip("/")
    else:
        with _real_server(tmp_path_factory.mktemp("serve")) as url:
            yield url


# ---- the browser --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver():
    """A headless Chromium session (Debian's chromium + chromedriver) kept to 127.0.0.1; quit after the module."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI and containers run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _png(path: Path, size: tuple[int, int]) -> Path:
    """Write a small test scene (:func:`serve_helpers.scene`) of ``size`` (W, H) as PNG to ``path``."""
    path.write_bytes(png(scene(*size)))
    return path


def _wait_image(drv, img_id: str) -> tuple[int, int]:
    """Wait until ``<img id=img_id>`` shows a decoded image, failing early with the page's error message.

    Returns:
        The image's natural size (width, height) in pixels.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        err = d.find_element("id", "error")
        if err.is_displayed() and err.text:
            raise AssertionError(f"the page shows an error: {err.text}")
        return d.execute_script(
            "const i = document.getElementById(arguments[0]);"
            "return i.complete && i.naturalWidth > 0 && i.offsetParent !== null;",
            img_id,
        )

    WebDriverWait(drv, WAIT_S, poll_frequency=0.2).until(ready)
    w, h = drv.execute_script(
        "const i = document.getElementById(arguments[0]); return [i.naturalWidth, i.naturalHeight];", img_id
    )
    return int(w), int(h)


def _open(drv, base_url: str) -> None:
    """Load the page fresh and wait for its script to have asked the server for its status."""
    from selenium.webdriver.support.ui import WebDriverWait

    drv.get(base_url + "/")
    WebDriverWait(drv, 30).until(lambda d: d.find_element("id", "server").text != "Checking the server…")


@pytest.fixture
def page(driver, base_url):
    """The page freshly loaded in the browser; afterwards, asserts its script raised no error.

    A failed request is logged by Chromium as an error too ("Failed to load resource"); those are the tests'
    business (the page shows them), so only the script's own errors count here.
    """
    driver.get_log("browser")  # drop what earlier tests left
    _open(driver, base_url)
    yield driver
    errors = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]
    assert errors == [], errors


# ---- tests --------------------------------------------------------------------------------------------------


def test_page_loads_offline_assets(page):
    """The page, its script and its style load from the server alone; the server status line is filled in."""
    driver = page
    assert driver.title.startswith("instdiff")
    status = driver.find_element("id", "server").text
    assert "Server ready" in status and "Model: " in status, status
    # every asset is local: no element points off the server
    urls = driver.execute_script(
        "return [...document.querySelectorAll('[src],[href]')]"
        ".map(e => e.getAttribute('src') || e.getAttribute('href'));"
    )
    assert all(not u.startswith(("http:", "https:", "//")) for u in urls), urls
    # the stylesheet applied (the error box is styled and hidden)
    assert not driver.find_element("id", "error").is_displayed()
    # every form control has a label, every image alt text
    unlabeled = driver.execute_script(
        "return [...document.querySelectorAll('input,select')]"
        ".filter(e => !(e.labels && e.labels.length)).map(e => e.id);"
    )
    assert unlabeled == []
    no_alt = driver.execute_script("return [...document.images].filter(i => !i.alt).map(i => i.id);")
    assert no_alt == []


def test_upload_and_edit(page, tmp_path):
    """Upload a PNG, run an edit: input, mask overlay and edited image appear at the input's size, with stats."""
    size = (48, 40)
    driver = page
    assert not driver.find_element("id", "edit-run").is_enabled()
    driver.find_element("id", "upload-file").send_keys(str(_png(tmp_path / "in.png", size)))
    assert _wait_image(driver, "input-img") == size
    assert driver.find_element("id", "edit-run").is_enabled()
    driver.find_element("id", "edit-source").send_keys("a blue square")
    driver.find_element("id", "edit-target").send_keys("a red square")
    driver.find_element("id", "edit-steps").send_keys(str(STEPS))
    driver.find_element("id", "edit-run").click()
    assert _wait_image(driver, "edit-output-img") == size
    assert _wait_image(driver, "edit-input-img") == size
    assert _wait_image(driver, "edit-overlay-img") == size
    stats = driver.find_element("id", "edit-stats").text
    assert "UNet calls" in stats and "total" in stats
    assert "instdiffedit" in stats


def test_session_generate_and_edit(page):
    """Generate from a prompt (a session starts), change the prompt: the new image, outline and timings appear."""
    driver = page
    driver.find_element("id", "gen-prompt").send_keys("a red circle")
    driver.find_element("id", "gen-steps").send_keys(str(STEPS))
    driver.find_element("id", "gen-run").click()
    size = _wait_image(driver, "input-img")
    assert driver.find_element("id", "session-form").is_displayed()
    assert driver.find_element("id", "session-id").text
    box = driver.find_element("id", "session-prompt")
    assert box.get_attribute("value") == "a red circle"
    box.clear()
    box.send_keys("a blue circle")
    driver.find_element("id", "session-run").click()
    assert _wait_image(driver, "session-after-img") == size
    assert _wait_image(driver, "session-outline-img") == size
    assert _wait_image(driver, "session-before-img") == size
    stats = driver.find_element("id", "session-stats").text
    for label in ("Edit time", "Full regeneration", "Speed-up", "Recomputed area"):
        assert label in stats, stats
    # the session keeps the new state: a second edit starts from it
    box.clear()
    box.send_keys("a green circle")
    driver.find_element("id", "session-run").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(
        lambda d: 'a blue circle" → "a green circle' in d.find_element("id", "session-stats").text
    )


def test_api_error_is_shown(page, tmp_path):
    """A request the API refuses (a whitespace-only target prompt) shows the API's message on the page."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = page
    driver.find_element("id", "upload-file").send_keys(str(_png(tmp_path / "in.png", (32, 32))))
    _wait_image(driver, "input-img")
    driver.find_element("id", "edit-target").send_keys("   ")
    driver.find_element("id", "edit-run").click()
    err = driver.find_element("id", "error")
    WebDriverWait(driver, WAIT_S).until(lambda d: err.is_displayed() and err.text)
    assert "HTTP 4" in err.text and "prompt" in err.text.lower(), err.text
    assert driver.find_element("id", "edit-run").is_enabled()  # the page stays usable


def test_lost_session_is_explained(page, base_url):
    """A session the server no longer holds: the edit shows the API's 404 message and the page starts over."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = page
    driver.find_element("id", "gen-prompt").send_keys("a red circle")
    driver.find_element("id", "gen-steps").send_keys(str(STEPS))
    driver.find_element("id", "gen-run").click()
    _wait_image(driver, "input-img")
    sid = driver.find_element("id", "session-id").text
    gone = urllib.request.Request(f"{base_url}/v1/sessions/{sid}", method="DELETE")
    with urllib.request.urlopen(gone, timeout=30) as r:
        assert r.status == 200
    box = driver.find_element("id", "session-prompt")
    box.clear()
    box.send_keys("a blue circle")
    driver.find_element("id", "session-run").click()
    err = driver.find_element("id", "error")
    WebDriverWait(driver, WAIT_S).until(lambda d: err.is_displayed() and err.text)
    assert "HTTP 404" in err.text and sid in err.text and "start a new session" in err.text, err.text
    assert not driver.find_element("id", "session-form").is_displayed()
