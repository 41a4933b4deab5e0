"""Hostile papers.yaml and metadata stores: `catalog check` (and render) answer every one with clear
lines naming the file, line and field, exit 1, and never a traceback or a hang.

Each case is what a careless contributor, a broken editor or a script could write. The loader is
strict (catalog/load.py): UTF-8, no control characters, no YAML tags, anchors, aliases or merge
keys, bounded nesting; identifiers matched whole; ids strict slugs that no site page uses.
"""

import json
import re
import subprocess
import sys

import pytest

from catalog.cli import main
from catalog.load import parse_catalog

from test_check import GOOD

ENTRY_LINES = GOOD.splitlines()  # lora: lines 1-9, blank line 10, prefix-tuning: lines 11-18


def swap(old: str, new: str, text: str = GOOD) -> str:
    assert old in text
    return text.replace(old, new, 1)


# (name, papers.yaml as bytes, a regex every one of whose lines must be among the error lines)
CASES = [
    (
        "not UTF-8",
        GOOD.encode().replace(b"Low-Rank", b"Low\xff-Rank"),
        [r"papers\.yaml:2: not UTF-8 text: byte 0xff at column 20; save the file as UTF-8"],
    ),
    (
        "Latin-1 file",
        GOOD.replace("Generation", "Générâtion").encode("latin-1"),
        [r"papers\.yaml:12: not UTF-8 text: byte 0xe9"],
    ),
    (
        "NUL byte",
        swap("Continuous", "Contin\x00uous").encode(),
        [r"papers\.yaml:12: character U\+0000 \(control character\) is not allowed in the file; remove it"],
    ),
    ("escape character", swap("Continuous", "Contin\x1buous").encode(), [r"papers\.yaml:12: character U\+001B"]),
    (
        "impossible date",
        swap("added: 2026-11-23", "added: 2026-13-45").encode(),
        [r"papers\.yaml:9: entry 'lora': added: '2026-13-45' is not a real date YYYY-MM-DD"],
    ),
    (
        "February 30th",
        swap("added: 2026-11-23", "added: 2026-02-30").encode(),
        [r"papers\.yaml:9: entry 'lora': added: '2026-02-30' is not a real date"],
    ),
    (
        "python tag",
        swap(
            'title: "LoRA: Low-Rank Adaptation of Large Language Models"',
            'title: !!python/object/apply:os.system ["echo pwned"]',
        ).encode(),
        [r"papers\.yaml:2: YAML tag !!python/object/apply:os\.system: write a plain value"],
    ),
    (
        "int tag on text",
        swap("kind: method", 'kind: !!int "abc"').encode(),
        [r"papers\.yaml:3: YAML tag !!int: write a plain value \(papers\.yaml uses no tags\)"],
    ),
    ("binary tag", swap("kind: method", "kind: !!binary aGVsbG8=").encode(), [r"papers\.yaml:3: YAML tag !!binary"]),
    ("local tag", swap("kind: method", "kind: !method method").encode(), [r"papers\.yaml:3: YAML tag !method"]),
    (
        "anchor and alias",
        swap(
            "  tags: [Prefix tuning]", "  tags: *lora_tags", swap("  tags: [LoRA]", "  tags: &lora_tags [LoRA]")
        ).encode(),
        [r"papers\.yaml:7: YAML anchor &lora_tags", r"papers\.yaml:16: YAML alias \*lora_tags"],
    ),
    (
        "merge key",
        ("- &base\n  " + GOOD[2:] + "\n- <<: *base\n  id: copy\n").encode(),
        [r"papers\.yaml:1: YAML anchor &base", r"papers\.yaml:21: YAML merge key <<", r"papers\.yaml:21: YAML alias"],
    ),
    (
        "20,000 nested brackets",
        (GOOD + "- " + "[" * 20_000 + "\n").encode(),
        [r"papers\.yaml:19: nested more than 10 levels deep"],
    ),
    (
        "20,000 nested mappings",
        (GOOD + "- " + "{a: " * 20_000 + "\n").encode(),
        [r"papers\.yaml:19: nested more than 10 levels deep"],
    ),
    (
        "id ending in a newline",
        swap("- id: lora", '- id: "lora\\n"').encode(),
        [r"papers\.yaml:1: entry '#1': id: malformed id 'lora\\n': expected a lower-case slug"],
    ),
    (
        "arXiv id ending in a newline",
        swap('arxiv: "2106.09685"', 'arxiv: "2106.09685\\n"').encode(),
        [r"papers\.yaml:5: entry 'lora': arxiv: malformed arxiv '2106\.09685\\n'"],
    ),
    (
        "DOI with a line break",
        swap('acl: "2021.acl-long.353"', 'doi: "10.1/a\\nb"').encode(),
        [r"papers\.yaml:15: entry 'prefix-tuning': doi: malformed doi"],
    ),
    (
        "S2 id in capitals",
        swap('acl: "2021.acl-long.353"', 's2: "' + "A" * 40 + '"').encode(),
        [r"papers\.yaml:15: entry 'prefix-tuning': s2: malformed s2 'A{40}'"],
    ),
    (
        "id that is a site page",
        swap("- id: prefix-tuning", "- id: index").encode(),
        [r"papers\.yaml:11: entry 'index': id: 'index' is reserved: papers/index/ is already a page of the site"],
    ),
    (
        "id with a newline in the middle",
        swap("- id: prefix-tuning", '- id: "prefix\\ntuning"').encode(),
        [r"papers\.yaml:11: entry '#2': id: malformed id"],
    ),
    (
        "id with a path",
        swap("- id: prefix-tuning", "- id: ../../etc").encode(),
        [r"papers\.yaml:11: entry '\.\./\.\./etc': id"],
    ),
    (
        "100,000-character title",
        swap('"Prefix-Tuning: Optimizing Continuous Prompts for Generation"', '"' + "x" * 100_000 + '"').encode(),
        [r"papers\.yaml:12: entry 'prefix-tuning': title: String should have at most 500 characters"],
    ),
    (
        "title over two lines",
        swap(
            '"Prefix-Tuning: Optimizing Continuous Prompts for Generation"', "|\n    Prefix-Tuning\n    Optimizing"
        ).encode(),
        [r"papers\.yaml:12: entry 'prefix-tuning': title: must be one line of text"],
    ),
    (
        "title read as yes/no",
        swap('"Prefix-Tuning: Optimizing Continuous Prompts for Generation"', "yes").encode(),
        [r"papers\.yaml:12: entry 'prefix-tuning': title: must be a quoted string: YAML read true as a yes/no value"],
    ),
    (
        "empty title",
        swap('"Prefix-Tuning: Optimizing Continuous Prompts for Generation"', "").encode(),
        [r"papers\.yaml:12: entry 'prefix-tuning': title: is empty"],
    ),
    (
        "huge number",
        swap('arxiv: "2106.09685"', "arxiv: " + "9" * 5000).encode(),
        [r"papers\.yaml:5: entry 'lora': arxiv: cannot read the value: Exceeds the limit"],
    ),
    ("empty file", b"", [r"papers\.yaml:1: no entries: the file is empty or holds only comments"]),
    ("only comments", b"# nothing yet\n# really\n", [r"papers\.yaml:1: no entries"]),
    ("an empty list", b"[]\n", [r"papers\.yaml:1: no entries"]),
    ("a mapping, not a list", b"id: lora\n", [r"papers\.yaml:1: the file must be a list of entries"]),
    (
        "two documents",
        (GOOD + "---\n" + GOOD).encode(),
        [r"papers\.yaml:19: YAML syntax: expected a single document in the stream, but found another document"],
    ),
    (
        "U+2028 inside a title",
        swap("Continuous", "Conti\u2028nuous").encode() + b"  bogus: 1\n",
        [r"papers\.yaml:12: character U\+2028 \(line separator\)", r"papers\.yaml:19: entry 'prefix-tuning': bogus"],
    ),
    ("U+0085 (next line)", swap("Continuous", "Conti\x85nuous").encode(), [r"papers\.yaml:12: character U\+0085"]),
    (
        "a lone carriage return",
        swap("Continuous", "Conti\rnuous").encode() + b"  bogus: 1\n",
        [
            r"papers\.yaml:12: character U\+000D \(carriage return without a line feed\)",
            r"papers\.yaml:19: entry 'prefix-tuning': bogus",
        ],
    ),
    (
        "byte-order mark inside",
        swap("Continuous", "Conti\ufeffnuous").encode(),
        [r"papers\.yaml:12: character U\+FEFF"],
    ),
    (
        "a list as a key",
        swap("  kind: method\n", "  ? [a, b]\n  : 1\n  kind: method\n").encode(),
        [r"papers\.yaml:3: entry 'lora': \(a non-scalar key\): unknown field"],
    ),
    (
        "a field given three times",
        swap("  kind: method\n", "  kind: method\n  kind: method\n  kind: method\n").encode(),
        [r"papers\.yaml:5: entry 'lora': kind: field given twice in one entry"],
    ),
    (
        "link with a newline",
        swap("https://github.com/microsoft/LoRA", '"https://github.com/x\\nevil"').encode(),
        [r"papers\.yaml:6: entry 'lora': code: .* is not an http\(s\):// link"],
    ),
    (
        "javascript link",
        swap("https://github.com/microsoft/LoRA", '"javascript://x.org/%0aalert(1)"').encode(),
        [r"papers\.yaml:6: entry 'lora': code: .* is not an http\(s\):// link"],
    ),
    (
        "500 tags",
        swap("tags: [LoRA]", "tags: [" + ", ".join(["LoRA"] * 500) + "]").encode(),
        [r"papers\.yaml:7: entry 'lora': tags: List should have at most 20 items"],
    ),
    (
        "entry that is a list",
        swap("- id: prefix-tuning\n", "- [id, prefix-tuning]\n- id: prefix-tuning\n").encode(),
        [r"papers\.yaml:11: entry #2 is not a mapping of fields"],
    ),
]


@pytest.mark.parametrize("name, data, expected", CASES, ids=[case[0] for case in CASES])
def test_hostile_papers_yaml_gets_clear_lines(tmp_path, monkeypatch, capsys, name, data, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "papers.yaml").write_bytes(data)
    (tmp_path / "store.json").write_text(json.dumps({"format": 1, "records": {}}))
    assert main(["--store", "store.json", "check"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    lines = err.splitlines()
    for pattern in expected:
        assert any(re.match(pattern, line) for line in lines), (pattern, lines[:8])
    # Every line is one problem located in the file: no line without "papers.yaml:N:".
    assert all(re.match(r"papers\.yaml:\d+: ", line) or re.match(r"reference_impls/", line) for line in lines), lines
    assert not any(line.startswith("reference_impls/") for line in lines) or parse_catalog(data).complete


def test_an_empty_file_says_so_once_and_nothing_about_the_modules(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "papers.yaml").write_text("# no entries yet\n")
    assert main(["check"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "papers.yaml:1: no entries: the file is empty or holds only comments; it must be a list of entries "
        "('- id: ...', see CONTRIBUTING.md)"
    ]


def test_crlf_and_a_leading_byte_order_mark_are_fine():
    for text in ("\ufeff" + GOOD, GOOD.replace("\n", "\r\n")):
        catalog = parse_catalog(text.encode())
        assert catalog.problems == [] and [entry.line for entry in catalog.entries] == [1, 11]
        assert catalog.entries[1].line_of("acl") == 15


def test_line_numbers_after_a_refused_character_stay_right():
    text = swap("Continuous", "Conti\u2028nuous") + "  bogus: 1\n"
    lines = [problem.line for problem in parse_catalog(text.encode()).problems]
    assert lines == [12, 19]  # the separator's own line, and the unknown field where an editor shows it


def test_deep_nesting_is_refused_quickly():
    import time

    started = time.perf_counter()
    catalog = parse_catalog(("- " + "[" * 200_000 + "\n").encode())
    assert not catalog.complete and "nested more than" in str(catalog.problems[0])
    assert time.perf_counter() - started < 2


def test_no_traceback_from_the_real_command(repo_copy):
    """The same classes through `python -m catalog`, as a contributor runs it."""
    (repo_copy / "papers.yaml").write_bytes(b"- id: x\n  title: \xff\n" + b"[" * 20_000)
    result = subprocess.run([sys.executable, "-m", "catalog", "check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "papers.yaml:2: not UTF-8 text: byte 0xff at column 10; save the file as UTF-8"


# ---- a store edited by hand ------------------------------------------------------------------------


def store_with(lora_paper=None, **record):
    from conftest import REPO

    data = json.loads((REPO / "catalog" / "metadata.json").read_text())
    if lora_paper is not None:
        data["records"]["lora"]["paper"].update(lora_paper)
    data["records"]["lora"].update(record)
    return json.dumps(data)


STORES = [
    ("year as words", store_with({"year": "soon"}), r"record 'lora': paper\.year: Input should be a valid integer"),
    (
        "authors as a string",
        store_with({"authors": "J"}),
        r"record 'lora': paper\.authors: Input should be a valid list",
    ),
    ("venue as an object", store_with({"venue": {}}), r"record 'lora': paper\.venue: Input should be a valid string"),
    ("openAccessPdf as a string", store_with({"openAccessPdf": "u"}), r"record 'lora': paper\.openAccessPdf"),
    ("citationStyles as a string", store_with({"citationStyles": "s"}), r"record 'lora': paper\.citationStyles"),
    ("tldr as a string", store_with({"tldr": "short"}), r"record 'lora': paper\.tldr"),
    (
        "impossible date",
        store_with({"publicationDate": "2020-13-01"}),
        r"record 'lora': paper\.publicationDate: '2020-13-01' is not a real date",
    ),
    ("no paperId", store_with({"paperId": None}), r"record 'lora': paper\.paperId"),
    ("unknown field", store_with({"titel": "x"}), r"record 'lora': paper\.titel: not a field"),
    ("bad retrieved time", store_with(retrieved="yesterday"), r"record 'lora': retrieved: 'yesterday' is not an ISO"),
    ("naive retrieved time", store_with(retrieved="2024-05-01T00:00:00"), r"record 'lora': retrieved: .* no time zone"),
    (
        "record without source",
        json.dumps({"format": 1, "records": {"lora": {"paper": {}, "retrieved": "x"}}}),
        r"record 'lora': a record has exactly the keys",
    ),
    (
        "records as a list",
        json.dumps({"format": 1, "records": []}),
        r"not a valid metadata store: 'records' must be an object",
    ),
    ("a list, not a store", "[1, 2]", r"not a valid metadata store: unknown store format 'list'"),
    ("not JSON", "{not json", r"not a valid metadata store \(not valid JSON"),
    ("not UTF-8", b'{"format": 1, "records": {"\xff": 1}}', r"not a valid metadata store \(not UTF-8"),
    ("20,000 nested arrays", "[" * 20_000, r"not a valid metadata store \(not valid JSON"),
]


@pytest.mark.parametrize("name, text, expected", STORES, ids=[case[0] for case in STORES])
@pytest.mark.parametrize("command", ["check", "render", "enrich"])
def test_hand_edited_store_is_refused_with_the_record_and_field(repo_copy, capsys, name, text, expected, command):
    store = repo_copy / "catalog" / "metadata.json"
    store.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = store.read_bytes()
    assert main([command, "--api-url", "http://127.0.0.1:9/graph/v1"] if command == "enrich" else [command]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert re.search(r"^error: catalog/metadata\.json: " + expected, err, re.M), err
    assert store.read_bytes() == before
