"""The web chat page in headless Chromium: enter the API key, ask, see the answer stream in, errors, reset.

Needs Debian's chromium and chromium-driver (apt) and the selenium package (pip); skipped otherwise.
Writes a screenshot to docs/serve-page.png with TUNESMITH_SCREENSHOT=1 (else to the test's temp folder).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BASE = "smollm2-135m-instruct"
KEY = "page-key"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve-page.png"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="headless browser test needs chromium and chromedriver: "
                              "apt-get install -y chromium chromium-driver"),
]


@pytest.fixture(scope="module")
def url():
    from tunesmith.models import registry
    from tunesmith.models.load import load_for_inference
    from tunesmith.serve.api import BackgroundServer, create_app

    try:
        path = registry.fetch(BASE, log=lambda m: None)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{BASE} is not available here: {e}")
    model, tok = load_for_inference(str(path), device="cpu")
    with BackgroundServer(create_app(model, tok, None, BASE, api_key=KEY)) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,760", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _wait(cond, timeout=60.0, what="condition"):
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_chat_page(url, browser, tmp_path_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    find = lambda css: d.find_element(By.CSS_SELECTOR, css)
    d.get(url + "/")
    assert d.title == "tunesmith chat"

    # the server wants a key: the page says so and opens the key field
    _wait(lambda: find("#keyRow").is_displayed() and find("#error").is_displayed(), what="the key prompt")
    assert "API key" in find("#errorText").text
    find("#apiKey").send_keys(KEY + Keys.TAB)  # change event -> models are listed
    _wait(lambda: find("#model").get_attribute("value") == BASE, what="the model list")
    assert not find("#error").is_displayed()

    find("#system").send_keys("You are a helpful assistant. Answer briefly.")
    find("#maxTokens").clear()
    find("#maxTokens").send_keys("40")
    d.execute_script("const t = arguments[0]; t.value = '0'; t.dispatchEvent(new Event('input'));",
                     find("#temperature"))  # greedy, so the answer is known
    assert find("#tempOut").text == "0"
    find("#toggleSettings").click()

    find("#input").send_keys("What is the capital of France?" + Keys.ENTER)
    answer = _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"), what="an answer bubble")[0]
    # streamed: text shows while the answer is still pending
    partial = _wait(lambda: "pending" in answer.get_attribute("class") and answer.text.strip(), what="partial text")
    assert partial
    _wait(lambda: "pending" not in answer.get_attribute("class"), what="the answer to finish")
    text = answer.text
    assert "Paris" in text, (text, find("#temperature").get_attribute("value"))
    assert "tokens" in find(".msg.assistant .meta").text
    assert not find("#error").is_displayed()

    # a second turn: the conversation so far goes with it
    find("#input").send_keys("And what is the capital of Germany?" + Keys.ENTER)
    _wait(lambda: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")) == 2, what="the second answer")
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, ".msg.user")] == [
        "What is the capital of France?", "And what is the capital of Germany?"]
    assert d.execute_script("return history.length") == 4

    shot = SCREENSHOT if os.environ.get("TUNESMITH_SCREENSHOT") else tmp_path_factory.mktemp("shot") / SCREENSHOT.name
    shot.parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # a server error is shown (max_tokens beyond the model's context)
    find("#toggleSettings").click()
    find("#maxTokens").clear()
    find("#maxTokens").send_keys("9000")
    find("#toggleSettings").click()
    find("#input").send_keys("Hello again" + Keys.ENTER)
    _wait(lambda: find("#error").is_displayed(), what="the error banner")
    assert "maximum context length" in find("#errorText").text

    # reset forgets the conversation
    find("#reset").click()
    assert d.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert find("#empty").is_displayed() and not find("#error").is_displayed()
