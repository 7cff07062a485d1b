"""`embedstore serve` in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) drives the page served by uvicorn on the toy cache: load, move a weight slider
and see the accuracy change, click a confusion cell and see its thumbnails, click one and see
its neighbours. A screenshot is kept in `.artifacts/playground.png` (or `$EMBEDSTORE_ARTIFACTS`).
Skipped, saying why, when Chromium, its driver or selenium is missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("no chromium/chromedriver (apt-get install -y chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
uvicorn = pytest.importorskip("uvicorn")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(os.environ.get("EMBEDSTORE_ARTIFACTS", Path(__file__).resolve().parents[2] / ".artifacts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(playground_files, tmp_path_factory):
    from embedstore import Cache
    from embedstore.encode.loop import prompt_encoder
    from embedstore.encode.thumbnails import thumbnail
    from embedstore.serve.app import create_app
    from embedstore.serve.playground import Playground

    cache_root, experiment = playground_files
    cache = Cache(cache_root)
    playground = Playground(cache, experiment, prompt_encoder(cache, "cpu"), None, thumbnail,
                            save_dir=tmp_path_factory.mktemp("browser-saved"))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(playground, allowed_hosts=["127.0.0.1"]), host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)
    playground.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1050"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _text(driver, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_page_moves_with_a_slider_and_shows_a_cell(server, browser):
    wait = WebDriverWait(browser, 30)
    browser.get(server)
    wait.until(lambda d: _text(d, "#accuracy"))
    before = _text(browser, "#accuracy")
    assert 0 < float(before) <= 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#confusion td.cell")) == 36
    assert len(browser.find_elements(By.CSS_SELECTOR, "#prompts .prompt")) == 5

    # second member's weight to 0: only the default view counts (0.7667 vs 0.7467 on the toy cache)
    slider = browser.find_element(By.CSS_SELECTOR, "input[type=range][data-member='1']")
    slider.send_keys(Keys.HOME)
    wait.until(lambda d: _text(d, "#accuracy") not in ("", before))
    assert browser.find_element(By.CSS_SELECTOR, "input[type=range][data-member='1']").get_attribute("value") == "0"

    # an off-diagonal cell with images: its thumbnails appear, loaded from /api/thumb
    cells = [c for c in browser.find_elements(By.CSS_SELECTOR, "#confusion td.cell")
             if c.text != "0" and c.get_attribute("data-true") != c.get_attribute("data-pred")]
    assert cells, "the toy model makes some mistakes"
    count = int(cells[0].text)
    cells[0].click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cell .thumb")) == count)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#cell .thumb img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert "predicted" in _text(browser, "#cell-title")

    # a thumbnail: its nearest images and classes
    browser.find_elements(By.CSS_SELECTOR, "#cell .thumb")[0].click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours .thumb")) == 12)
    assert "nearest classes" in _text(browser, "#neighbours")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_prompt_table_search_and_save_from_the_page(server, browser):
    wait = WebDriverWait(browser, 30)
    browser.get(server)
    wait.until(lambda d: _text(d, "#accuracy"))
    browser.find_element(By.ID, "prompt-table-go").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#prompt-table tr")) == 1 + 4)
    assert "accuracy with every template" in _text(browser, "#prompt-table-status")

    box = browser.find_element(By.ID, "search-text")
    box.send_keys("a photo of a Sea.", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#search-results .thumb")) == 24)

    browser.find_element(By.ID, "save-name").send_keys("from-the-page")
    browser.find_element(By.ID, "save").click()
    wait.until(lambda d: "wrote" in _text(d, "#save-result") or "error" in d.page_source)
    assert "from-the-page.toml" in _text(browser, "#save-result")
    assert "from-the-page" in _text(browser, "#variants")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("document.getElementById('prompt-table').scrollIntoView()")
    assert browser.save_screenshot(str(ARTIFACTS / "playground-prompts.png"))
