"""The site as a reader uses it: headless Chromium searches, opens a paper, follows its links.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them). Screenshots of every step
are saved under test-artifacts/ for CI to keep.
"""

import functools
import http.server
import shutil
import threading

import pytest
from test_site import build

from conftest import REPO, copy_repo_inputs

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)",
)
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def site_url(tmp_path_factory):
    site = build(copy_repo_inputs(tmp_path_factory.mktemp("browser")))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags that keep Chromium from reaching for the network, which this machine does not have.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def wait_for(browser, condition, timeout=20):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # Material redraws the search results as its worker catches up with each typed letter, so an
    # element found a moment ago may be gone: look again rather than fail.
    return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def click(browser, css: str) -> None:
    """Click the element once it is there and clickable, finding it afresh on every try."""
    from selenium.webdriver.common.by import By

    def attempt(driver):
        element = driver.find_element(By.CSS_SELECTOR, css)
        if not (element.is_displayed() and element.is_enabled()):
            return False
        element.click()
        return True

    wait_for(browser, attempt)


def test_search_lora_open_its_page_and_follow_the_implementation_link(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen

    browser.get(site_url)
    assert "Awesome Adapters" in browser.title
    click(browser, "label.md-search__icon, .md-search__input")
    box = wait_for(browser, seen.element_to_be_clickable((By.CSS_SELECTOR, "input.md-search__input")))
    box.send_keys("LoRA")
    wait_for(
        browser, seen.element_to_be_clickable((By.CSS_SELECTOR, ".md-search-result__list a[href*='papers/lora/']"))
    )
    browser.save_screenshot(str(ARTIFACTS / "1-search-lora.png"))
    click(browser, ".md-search-result__list a[href*='papers/lora/']")

    heading = wait_for(browser, seen.visibility_of_element_located((By.CSS_SELECTOR, ".aa-paper h1")))
    assert heading.text == "LoRA: Low-Rank Adaptation of Large Language Models"
    page = browser.find_element(By.CSS_SELECTOR, "article").text
    assert "J. E. Hu" in page and "International Conference on Learning Representations" in page
    assert "BibTeX" in page and "Edit this entry" in page
    browser.save_screenshot(str(ARTIFACTS / "2-lora-paper.png"))

    click(browser, ".aa-impl-box a.aa-impl")
    wait_for(
        browser, seen.text_to_be_present_in_element((By.CSS_SELECTOR, "article h1"), "Reference implementation: lora")
    )
    assert browser.find_element(By.CSS_SELECTOR, "article h1").text == "Reference implementation: lora"
    code = browser.find_element(By.CSS_SELECTOR, "article .highlight code").text
    assert "class LoRALinear(nn.Module):" in code and "def merge(self)" in code
    # The real file, whole (the browser's text drops blank lines, so compare the others).
    lines = lambda text: [line.rstrip() for line in text.splitlines() if line.strip()]
    assert lines(code) == lines((REPO / "reference_impls" / "lora.py").read_text())
    browser.save_screenshot(str(ARTIFACTS / "3-lora-implementation.png"))


def test_all_papers_table_filters_and_sorts(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(site_url + "papers/")
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, ".aa-table tbody tr")
    wait_for(browser, lambda _: len(rows()) == 67)
    browser.find_element(By.CSS_SELECTOR, ".aa-filters input[name=q]").send_keys("lora")
    wait_for(browser, lambda _: 0 < len(rows()) < 67)
    assert all("lora" in row.find_element(By.TAG_NAME, "a").text.lower() for row in rows())
    browser.find_element(By.CSS_SELECTOR, ".aa-filters input[name=q]").clear()
    Select(browser.find_element(By.CSS_SELECTOR, ".aa-filters select[name=section]")).select_by_value("NLP / Serving")
    wait_for(browser, lambda _: len(rows()) == 2)
    browser.find_element(By.CSS_SELECTOR, "th[data-key=title]").click()
    titles = [row.find_element(By.TAG_NAME, "a").text for row in rows()]
    assert titles == sorted(titles)
    browser.save_screenshot(str(ARTIFACTS / "4-table-filtered.png"))
