"""Headless Chromium on a loopback server: shared by tests/test_browser.py and benchmarks/site_build.py."""

import functools
import http.server
import shutil
import threading
import time
from pathlib import Path

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def is_search_file(path: str) -> bool:
    """Pagefind's bundle, or Material's index and search worker."""
    path = path.split("?")[0].lstrip("/")
    return "pagefind/" in path or "search/search_index.json" in path or "javascripts/workers/search" in path


def loopback_server(directory: Path, not_found: Path | None = None):
    """An HTTP server for directory on 127.0.0.1; a missing path gets not_found's page with status
    404, as GitHub Pages does. Returns (server, its root URL)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def setup(self):
            super().setup()
            # Count what is sent, headers included: the browser's own logs miss what Web Workers
            # fetch (Pagefind searches in one), the server sees every byte.
            write = self.wfile.write

            def counted(data):
                with lock:
                    server.bytes_sent += len(data)
                    if getattr(self, "path", None) and is_search_file(self.path):
                        server.search_bytes_sent += len(data)
                return write(data)

            self.wfile.write = counted

        def send_error(self, code, message=None, explain=None):
            if code != 404 or not_found is None:
                return super().send_error(code, message, explain)
            body = not_found.read_bytes()
            self.send_response(404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    lock = threading.Lock()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    server.bytes_sent = server.search_bytes_sent = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def chromium(profile: Path, width: int = 1280):
    """A headless Chromium that logs every request (for the privacy test and the byte counts)."""
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
        f"--window-size={width},1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    return driver


def type_and_wait(driver, query: str, material: bool = False, timeout: float = 60) -> float:
    """Clear the header's search box (ours, or Material's), type query and return the seconds until
    the first result link is on screen (the results of the query's first letters count: that is
    when a reader sees something)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if material:
        box, results = driver.find_element(By.CSS_SELECTOR, "input.md-search__input"), ".md-search-result__list a"
    else:
        box, results = driver.find_element(By.CSS_SELECTOR, ".aa-search__input"), ".aa-search__list a"
    # One script call, so a list redrawn between two looks cannot leave a stale element behind.
    shown = lambda: driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].some((link) => link.offsetParent !== null)", results
    )
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    deadline = time.perf_counter() + timeout
    while shown() and time.perf_counter() < deadline:  # the last query's results go first
        time.sleep(0.01)
    start = time.perf_counter()
    box.send_keys(query)
    while time.perf_counter() - start < timeout:
        if shown():
            return time.perf_counter() - start
        time.sleep(0.005)
    raise TimeoutError(f"no result for {query!r} within {timeout} s")
