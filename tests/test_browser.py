"""The site as a reader uses it: headless Chromium searches, opens a paper, follows its links.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them). Screenshots of every step
are saved under test-artifacts/ for CI to keep.
"""

import json
from urllib.parse import urlsplit

import pytest
from test_site import ENTRIES, build

from catalog.load import load_catalog

from browser_helpers import CHROMIUM, DRIVER, chromium, loopback_server, type_and_wait
from conftest import REPO, copy_repo_inputs

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)",
)
ARTIFACTS = REPO / "test-artifacts"
SERVING_ENTRIES = sum(entry.section == "NLP / Serving" for entry in load_catalog(REPO / "papers.yaml").entries)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    return build(copy_repo_inputs(tmp_path_factory.mktemp("browser")))


@pytest.fixture(scope="module")
def site_url(built_site):
    server, url = loopback_server(built_site, built_site / "404.html")
    yield url
    server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium"))
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


def search(browser, query: str) -> list[str]:
    """Type a query into the header's search box; the result links' hrefs once they appear."""
    from selenium.webdriver.common.by import By

    type_and_wait(browser, query)
    return [link.get_attribute("href") for link in browser.find_elements(By.CSS_SELECTOR, ".aa-search__list a")]


def test_search_lora_open_its_page_and_follow_the_implementation_link(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen

    browser.get(site_url)
    assert "Awesome Adapters" in browser.title
    # The paper named exactly as the query comes first, before its many relatives and the implementations.
    assert search(browser, "LoRA")[0].endswith("papers/lora/")
    browser.save_screenshot(str(ARTIFACTS / "1-search-lora.png"))
    click(browser, ".aa-search__list a[href$='papers/lora/']")

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
    sections = browser.find_elements(By.CSS_SELECTOR, ".aa-section")
    titles = [section.find_element(By.CSS_SELECTOR, ".aa-section__title").text for section in sections]
    assert "class LoRALinear" in titles and "LoRALinear.merge" in titles
    merge = sections[titles.index("LoRALinear.merge")]
    assert "def merge(self)" in merge.find_element(By.CSS_SELECTOR, ".aa-code").text
    # The method's equations, as MathML: the merge rule among them.
    method = browser.find_element(By.CSS_SELECTOR, ".aa-method")
    assert len(method.find_elements(By.TAG_NAME, "math")) >= 8 and "inference costs nothing" in method.text
    # The code column, section after section, is the real file without its docstrings and the
    # comments shown as prose (the browser's text drops blank lines, so compare the others).
    source = (REPO / "reference_impls" / "lora.py").read_text().splitlines()
    code_text = "\n".join(section.find_element(By.CSS_SELECTOR, ".aa-code pre").text for section in sections)
    shown = [line.rstrip() for line in code_text.splitlines()]
    position = 0
    for line in filter(None, shown):
        position = source.index(line, position) + 1  # each shown line appears in the file, in order
    lines_link = merge.find_element(By.CSS_SELECTOR, ".aa-lines").get_attribute("href")
    first, last = map(int, lines_link.rsplit("#L", 1)[1].split("-L"))
    assert "def merge(self)" in "\n".join(source[first - 1 : last])
    browser.save_screenshot(str(ARTIFACTS / "3-lora-implementation.png"))


def prose_overflow(browser) -> list[str]:
    """Prose blocks of the page wider than their column, or past the window's right edge."""
    return browser.execute_script(
        """
        const page = document.documentElement, width = page.clientWidth, wide = [];
        if (page.scrollWidth > width) wide.push("the page: " + page.scrollWidth);
        const prose = ".aa-prose, .aa-prose p, .aa-prose li, .aa-method, .aa-impl-facts p";
        document.querySelectorAll(prose).forEach((el) => {
          const box = el.getBoundingClientRect();
          if (el.scrollWidth > el.clientWidth + 1 || box.right > width + 1)
            wide.push(el.className + ": " + el.textContent.slice(0, 40));
        });
        return wide;
        """
    )


@pytest.mark.parametrize("width", [1280, 390])
def test_annotated_pages_render_maths_and_fit_their_columns(browser, site_url, width):
    from selenium.webdriver.common.by import By

    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 500},
    )
    try:
        for slug in ("lora", "bottleneck", "routing", "kernels.punica"):
            browser.get(f"{site_url}impls/{slug}/")
            wait_for(browser, lambda driver: driver.find_elements(By.CSS_SELECTOR, ".aa-section"))
            maths = browser.find_elements(By.CSS_SELECTOR, ".aa-method math, .aa-prose math")
            assert maths and all(m.size["width"] > 0 for m in maths[:20]), slug  # MathML, laid out
            assert prose_overflow(browser) == [], (slug, width)
            # Two columns on a wide screen, one on a phone.
            section = browser.find_element(By.CSS_SELECTOR, ".aa-section")
            prose, code = (section.find_element(By.CSS_SELECTOR, css).rect for css in (".aa-prose", ".aa-code"))
            assert (code["x"] > prose["x"]) if width > 1220 else (code["y"] > prose["y"]), (slug, width)
        browser.save_screenshot(str(ARTIFACTS / f"5-annotated-{width}.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_search_ranks_a_paper_above_the_code_that_cites_it(browser, site_url):
    browser.get(site_url)
    results = search(browser, "Houlsby")
    assert results[0].endswith("papers/houlsby-adapter/"), results
    assert any("/impls/bottleneck/" in href for href in results)
    browser.save_screenshot(str(ARTIFACTS / "6-search-houlsby.png"))


def test_all_papers_table_filters_and_sorts(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(site_url + "papers/")
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, ".aa-table tbody tr")
    wait_for(browser, lambda _: len(rows()) == ENTRIES)
    browser.find_element(By.CSS_SELECTOR, ".aa-filters input[name=q]").send_keys("lora")
    wait_for(browser, lambda _: 0 < len(rows()) < ENTRIES)
    assert all("lora" in row.find_element(By.TAG_NAME, "a").text.lower() for row in rows())
    browser.find_element(By.CSS_SELECTOR, ".aa-filters input[name=q]").clear()
    Select(browser.find_element(By.CSS_SELECTOR, ".aa-filters select[name=section]")).select_by_value("NLP / Serving")
    wait_for(browser, lambda _: len(rows()) == SERVING_ENTRIES)
    browser.find_element(By.CSS_SELECTOR, "th[data-key=title]").click()
    titles = [row.find_element(By.TAG_NAME, "a").text for row in rows()]
    assert titles == sorted(titles)
    browser.save_screenshot(str(ARTIFACTS / "4-table-filtered.png"))


def test_table_headers_are_buttons_numbers_sort_largest_first_and_the_view_is_in_the_address(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site_url + "papers/")
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, ".aa-table tbody tr")
    wait_for(browser, lambda _: len(rows()) == ENTRIES)
    citations = browser.find_element(By.CSS_SELECTOR, "th[data-key=citations] button")
    browser.execute_script("arguments[0].focus()", citations)
    citations.send_keys(Keys.ENTER)  # a focused button: what Tab reaches, Enter presses
    counts = [row.find_elements(By.TAG_NAME, "td")[7].text for row in rows()]
    numbers = [int(count) for count in counts if count]
    assert numbers == sorted(numbers, reverse=True) and numbers, counts
    assert all(counts[: len(numbers)]) and not any(counts[len(numbers) :])  # blanks last
    browser.find_element(By.CSS_SELECTOR, ".aa-filters input[name=q]").send_keys("lora")
    wait_for(browser, lambda _: 0 < len(rows()) < ENTRIES)
    shown = len(rows())
    address = browser.current_url
    assert "q=lora" in address and "sort=-citations" in address
    browser.get(address)  # the shared link opens the same view
    wait_for(browser, lambda _: len(rows()) == shown)
    assert browser.find_element(By.CSS_SELECTOR, ".aa-filters input[name=q]").get_attribute("value") == "lora"
    assert browser.find_element(By.CSS_SELECTOR, "th[data-key=citations]").get_attribute("aria-sort") == "descending"


def test_all_papers_table_fits_a_phone(browser, site_url):
    from selenium.webdriver.common.by import By

    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
    )
    try:
        browser.get(site_url + "papers/")
        wait_for(browser, lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".aa-table tbody tr")) == ENTRIES)
        width = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert width[0] <= width[1], width
        table = browser.find_element(By.CSS_SELECTOR, ".aa-table table")
        assert table.rect["x"] + table.rect["width"] <= width[1] + 1
        browser.save_screenshot(str(ARTIFACTS / "4b-table-phone.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_comparison_page_lists_every_method_and_sorts(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site_url + "impls/comparison/")
    table = wait_for(browser, lambda driver: driver.find_element(By.CSS_SELECTOR, "table.aa-comparison"))
    rows = lambda: table.find_elements(By.CSS_SELECTOR, "tbody tr")
    names = [row.find_element(By.TAG_NAME, "a").text for row in rows()]
    assert {"LoRA", "DoRA", "(IA)³", "Houlsby adapter", "Prompt tuning", "LLaMA-Adapter"} <= set(names)
    lora = rows()[names.index("LoRA")].find_elements(By.TAG_NAME, "td")
    assert lora[2].text == "294,912" and lora[4].text == "4,194,304" and lora[6].text == "yes"
    assert rows()[0].find_element(By.TAG_NAME, "a").get_attribute("href").endswith("/impls/lora/")
    button = table.find_elements(By.CSS_SELECTOR, "thead th button")[4]  # Llama-2-7B: trainable
    browser.execute_script("arguments[0].focus()", button)
    button.send_keys(Keys.ENTER)
    cells = [row.find_elements(By.TAG_NAME, "td")[4].text for row in rows()]
    numbers = [int(cell.replace(",", "")) for cell in cells if cell != "n/a"]
    assert numbers == sorted(numbers, reverse=True) and cells[-1] == "n/a"
    browser.save_screenshot(str(ARTIFACTS / "7-comparison.png"))


def test_not_found_page_works_under_a_sub_path(browser, built_site, tmp_path):
    from selenium.webdriver.common.by import By

    mount = tmp_path / "mount" / "some" / "place"
    mount.parent.mkdir(parents=True)
    mount.symlink_to(built_site, target_is_directory=True)
    server, root = loopback_server(tmp_path / "mount", built_site / "404.html")
    try:
        browser.get(root + "some/place/papers/no-such-paper/")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Page not found"
        wait_for(browser, lambda driver: driver.find_element(By.TAG_NAME, "html").get_attribute("data-root"))
        links = [link.get_attribute("href") for link in browser.find_elements(By.CSS_SELECTOR, "main a")]
        assert links == [root + "some/place/", root + "some/place/papers/", root + "some/place/impls/"]
        header = browser.find_element(By.TAG_NAME, "header")
        assert header.size["height"] < 100 and header.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
        browser.save_screenshot(str(ARTIFACTS / "8-not-found.png"))
        browser.find_elements(By.CSS_SELECTOR, "main a")[1].click()
        wait_for(browser, lambda driver: driver.find_elements(By.CSS_SELECTOR, ".aa-table tbody tr"))
    finally:
        server.shutdown()


def test_no_request_leaves_loopback(browser, site_url):
    """Every page type, searched and clicked through: all requests go to 127.0.0.1."""
    browser.get_log("performance")  # drop what earlier tests logged; this test walks every kind of page itself
    for page in ("", "papers/", "papers/lora/", "impls/lora/", "impls/comparison/", "tags/lora/", "no-such-page/"):
        browser.get(site_url + page)
        wait_for(browser, lambda driver: driver.execute_script("return document.readyState") == "complete")
    browser.get(site_url)
    search(browser, "adapter")
    hosts = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith(("data:", "blob:")):
                hosts.add(urlsplit(url).hostname)
    assert hosts == {"127.0.0.1"}


@pytest.fixture(scope="module")
def large_site(tmp_path_factory):
    """The site of a 10,000-entry synthetic catalog (about 40 s to build on 2 cores)."""
    from synthetic_catalog import write_synthetic

    root = copy_repo_inputs(tmp_path_factory.mktemp("large"))
    write_synthetic(root, 10_000)
    return build(root)


def test_search_at_ten_thousand_entries_fetches_little(browser, large_site):
    """Pagefind fetches only the index fragments a query needs: at 10,000 entries a query, the first
    included (it loads the search code), stays under 1.5 MB. Its speed is measured, side by side
    with Material's search, by benchmarks/site_build.py, not here."""
    from selenium.webdriver.common.by import By

    server, url = loopback_server(large_site)
    try:
        browser.get(url)
        for query in ("adapter", "routing experts", "orthogonal budget"):
            before = server.search_bytes_sent
            type_and_wait(browser, query)
            wait_for(browser, lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".aa-search__list a")) == 8)
            links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, ".aa-search__list a")]
            assert all("/papers/" in link or "/impls/" in link for link in links), links
            fetched = server.search_bytes_sent - before  # the search's own files: code, index, fragments
            assert fetched < 1_500_000, (query, fetched)
        meta = browser.find_element(By.CSS_SELECTOR, ".aa-search__meta").text
        assert meta.startswith("The first 8 of ") and int(meta.split(" of ")[1].split()[0]) > 100
        browser.save_screenshot(str(ARTIFACTS / "9-search-10000.png"))
    finally:
        server.shutdown()
