"""Stage 5: the site's search index, built by Pagefind over the finished HTML.

Pagefind reads every page that marks a `data-pagefind-body` (paper pages, implementation pages, the
comparison page and the hand-written pages that ask for it) and writes `pagefind/` beside them: an
index cut into fragments of a few KB, so a query in the browser fetches only the fragments for its
words (site/assets/javascripts/search.js). Weights put a paper's title and authors above the text of
an implementation page that mentions them.
"""

import subprocess
import sys
from pathlib import Path

BUNDLE = "pagefind"  # the folder under the site root; search.js loads <root>/pagefind/pagefind.js


class SearchIndexError(RuntimeError):
    """Pagefind failed; its own message is kept."""


def build_search_index(site_dir: Path) -> str:
    """Index site_dir in place; returns a one-line summary (how many pages the index holds)."""
    command = [sys.executable, "-m", "pagefind", "--site", str(site_dir), "--output-subdir", BUNDLE, "--quiet"]
    # --include-characters: method names such as (IA)^3 or LoRA+ stay searchable as typed.
    command += ["--include-characters", "+³"]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SearchIndexError(f"could not run pagefind: {error}") from None
    if finished.returncode != 0:
        raise SearchIndexError(f"pagefind failed: {(finished.stderr or finished.stdout).strip()}")
    pages = sum(1 for _ in (site_dir / BUNDLE / "fragment").iterdir()) if (site_dir / BUNDLE).exists() else 0
    if pages == 0:
        raise SearchIndexError("pagefind indexed no page: no data-pagefind-body found in the site")
    return f"search index: {pages} pages in {BUNDLE}/"
