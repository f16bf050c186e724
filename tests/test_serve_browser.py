"""The page of `dinobridge serve` in a real browser: headless Chromium, driven by Playwright, against a
`dinobridge serve` process on 127.0.0.1 over an index of synthetic scenes.

It does what a person does (types a query, pages, goes back, asks for more like a result, uploads and drops
a query image, turns on "show where", works the page by keyboard) and checks what they see against the
JSON API's answers. Chromium comes from the system (Debian's `chromium` package): Playwright's own browser
download needs network access that this project's machines do not have.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.index import ImageIndex
from bridge.serve import image_id
from bridge.synthetic import SyntheticWorld

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCENES = 30
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="the browser test needs Chromium: apt-get install chromium (Debian/Ubuntu), as .ci/run does",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bridge) -> Iterator[tuple[str, Path]]:
    """(base URL, photo folder) of a `dinobridge serve` process over SCENES synthetic scenes."""
    root = tmp_path_factory.mktemp("browser")
    folder, model = root / "scenes", root / "model"
    folder.mkdir()
    for number, scene in enumerate(SyntheticWorld(seed=0, image_size=224).scenes(0, SCENES)):
        scene.render().save(folder / f"scene{number:03d}.png")
    tiny_bridge.save_pretrained(model)
    ImageIndex.build(folder, tiny_bridge, root / "index", workers=0, progress=False, model_dir=model)
    port = free_port()
    command = [sys.executable, "-m", "bridge.cli", "serve", str(root / "index"), "--port", str(port)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("DINOBRIDGE_TOKEN", None)
    log = open(root / "serve.log", "w")  # noqa: SIM115 (closed below, after the server stops)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"dinobridge serve exited with {process.returncode}:\n{(root / 'serve.log').read_text()}"
                )
            try:
                get_json(f"{base}/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"dinobridge serve did not answer in 180 s:\n{(root / 'serve.log').read_text()}"
                    )
                time.sleep(0.3)
        yield base, folder
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn's own way to stop
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser test needs Playwright: pip install playwright"
    )
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []  # script errors and refused resources (a CSP violation lands here too)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    yield page
    page.close()
    assert not problems


def api(base: str, **params) -> dict:
    return get_json(f"{base}/api/search?{urllib.parse.urlencode(params, doseq=True)}")


def shown_paths(page) -> list[str]:
    return page.locator("#grid .path").all_inner_texts()


def wait_for_results(page, paths: list[str]) -> None:
    """Until the grid shows exactly `paths` and every thumbnail (or heatmap) has loaded."""
    page.wait_for_function(
        """paths => {
            const shown = [...document.querySelectorAll('#grid .path')].map(p => p.textContent);
            const images = [...document.querySelectorAll('#grid img')];
            return JSON.stringify(shown) === JSON.stringify(paths)
                && images.every(image => image.complete && image.naturalWidth > 0);
        }""",
        arg=paths,
        timeout=60_000,
    )


def test_a_typed_query_shows_its_thumbnails_and_pages_with_back_and_forward(page, server) -> None:
    base, _ = server
    page.goto(f"{base}/")
    page.fill("#q", "a red circle")
    page.keyboard.press("Enter")
    expected = api(base, q="a red circle")
    wait_for_results(page, [hit["path"] for hit in expected["results"]])
    assert len(expected["results"]) == 24
    assert "?q=a+red+circle" in page.url
    assert f"1–24 of {SCENES} images searched in" in page.inner_text("#summary")
    scores = page.locator("#grid .score").all_inner_texts()
    assert scores == [f"{hit['score']:.3f}" for hit in expected["results"]]

    page.click("#next")
    second = api(base, q="a red circle", offset=24)
    wait_for_results(page, [hit["path"] for hit in second["results"]])
    assert "offset=24" in page.url and page.inner_text("#page") == "page 2"
    page.go_back()
    wait_for_results(page, [hit["path"] for hit in expected["results"]])
    page.go_forward()
    wait_for_results(page, [hit["path"] for hit in second["results"]])

    # A link with the query opens with its results.
    page.goto(f"{base}/?q=a+blue+square&minus=circle")
    found = api(base, q="a blue square", minus="circle")
    wait_for_results(page, [hit["path"] for hit in found["results"]])
    assert page.input_value("#minus") == "circle"


def test_more_like_this_and_a_query_image_by_picker_and_by_drop(page, server) -> None:
    base, folder = server
    page.goto(f"{base}/?q=a+green+star")
    first = api(base, q="a green star")["results"]
    wait_for_results(page, [hit["path"] for hit in first])

    page.locator("#grid .like").nth(2).click()
    like = api(base, like=first[2]["id"])
    wait_for_results(page, [hit["path"] for hit in like["results"]])
    assert shown_paths(page)[0] == first[2]["path"] and f"like={first[2]['id']}" in page.url
    assert "DINOv2 image space" in page.inner_text("#summary")
    assert page.is_visible("#query-like") and page.input_value("#q") == ""

    page.click("#clear-like")
    page.set_input_files("#file", str(folder / "scene007.png"))
    by_upload = api(base, like=image_id("scene007.png"))
    wait_for_results(page, [hit["path"] for hit in by_upload["results"]])
    assert shown_paths(page)[0] == "scene007.png" and page.is_visible("#query-image")

    # Dropped on the page: a DataTransfer holding the file, as a drag from the desktop delivers it.
    data = base64.b64encode((folder / "scene011.png").read_bytes()).decode()
    page.evaluate(
        """data => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            document.dispatchEvent(new DragEvent('dragenter', {dataTransfer: transfer}));
            document.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer}));
        }""",
        data,
    )
    by_drop = api(base, like=image_id("scene011.png"))
    wait_for_results(page, [hit["path"] for hit in by_drop["results"]])
    assert page.is_hidden("#drop")


def test_show_where_lays_the_heatmaps_over_the_results_and_saves_a_screenshot(
    page, server, tmp_path: Path
) -> None:
    base, _ = server
    page.goto(f"{base}/?q=a+yellow+triangle")
    expected = api(base, q="a yellow triangle", k=24)["results"]
    wait_for_results(page, [hit["path"] for hit in expected])
    page.check("#where")
    wait_for_results(page, [hit["path"] for hit in expected])  # every heatmap loaded
    sources = page.eval_on_selector_all("#grid img", "images => images.map(image => image.src)")
    assert [urllib.parse.urlsplit(s).path for s in sources] == [
        f"/api/images/{h['id']}/heatmap" for h in expected
    ]

    page.locator("#grid .open").first.click()
    page.wait_for_selector("#viewer[open]")
    assert "/heatmap?" in page.get_attribute("#viewer-image", "src")
    page.keyboard.press("Escape")
    page.uncheck("#where")
    wait_for_results(page, [hit["path"] for hit in expected])
    assert all("/thumbnail?" in s for s in page.eval_on_selector_all("#grid img", "l => l.map(i => i.src)"))
    screenshot = tmp_path / "serve.png"
    page.screenshot(path=str(screenshot), full_page=False)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {screenshot}")


def test_the_page_works_by_keyboard(page, server) -> None:
    base, _ = server
    page.goto(f"{base}/?q=a+purple+square")
    expected = api(base, q="a purple square")["results"]
    wait_for_results(page, [hit["path"] for hit in expected])
    page.locator("#grid .open").first.focus()
    page.keyboard.press("Enter")  # open the larger view
    page.wait_for_selector("#viewer[open]")
    assert page.inner_text("#viewer-path") == expected[0]["path"]
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#viewer-path") == expected[1]["path"]
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer", state="hidden")
    page.keyboard.press("/")  # back to the search box from anywhere
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type(" on the left")
    page.keyboard.press("Enter")
    moved = api(base, q="a purple square on the left")["results"]
    wait_for_results(page, [hit["path"] for hit in moved])
