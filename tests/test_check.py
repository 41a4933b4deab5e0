"""`catalog check` on the real catalog and on broken copies of it: exit status and file:line messages."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from catalog.cli import main
from catalog.identifiers import normalise_title
from catalog.impls import ImplModule
from catalog.load import parse_catalog
from catalog.validate import validate

GOOD = """\
- id: lora
  title: "LoRA: Low-Rank Adaptation of Large Language Models"
  kind: method
  section: NLP / Methods
  arxiv: "2106.09685"
  code: https://github.com/microsoft/LoRA
  tags: [LoRA]
  impl: [lora]
  added: 2026-11-23

- id: prefix-tuning
  title: "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
  kind: method
  section: NLP / Methods
  acl: "2021.acl-long.353"
  tags: [Prefix tuning]
  impl: [prompts]
  added: 2026-11-23
"""


def modules(*specs):
    """ImplModule records: ("lora", ("lora",)) is reference_impls/lora.py implementing entry 'lora'."""
    return {slug: ImplModule(slug, Path(f"reference_impls/{slug}.py"), "", tuple(ids)) for slug, ids in specs}


def check(text, stored=("lora", "prefix-tuning"), impls=None, strict=False):
    catalog = parse_catalog(text, "papers.yaml")
    impls = modules(("lora", ("lora",)), ("prompts", ("prefix-tuning",))) if impls is None else impls
    return catalog, validate(catalog, stored, impls, strict_impl=strict)


def messages(problems):
    return [str(problem) for problem in problems if problem.severity == "error"]


def test_good_catalog_has_no_problems():
    catalog, problems = check(GOOD)
    assert [entry.id for entry in catalog.entries] == ["lora", "prefix-tuning"]
    assert problems == []
    assert catalog.entries[1].line == 11 and catalog.entries[1].line_of("acl") == 15


def test_the_real_catalog_is_clean(capsys):
    entries = len(parse_catalog(Path("papers.yaml").read_text()).entries)
    assert main(["check"]) == 0
    assert f"{entries} entries, 0 error(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "broken, expected",
    [
        # YAML syntax: an unclosed quote, reported at its line.
        (
            GOOD.replace("  kind: method\n", "   kind: method\n", 1),
            r"^papers\.yaml:3: YAML syntax: expected <block end>, but found '<block mapping start>'$",
        ),
        (
            GOOD.replace('  title: "LoRA: Low-Rank Adaptation of Large Language Models"\n', ""),
            r"^papers\.yaml:1: entry 'lora': title: required field is missing$",
        ),
        (
            GOOD.replace("id: prefix-tuning", "id: lora"),
            r"^papers\.yaml:11: entry 'lora': id: duplicate id: already used by the entry at papers\.yaml:1$",
        ),
        (
            GOOD.replace('acl: "2021.acl-long.353"', 'arxiv: "2106.09685"'),
            r"^papers\.yaml:15: entry 'prefix-tuning': arxiv: same paper as entry 'lora' \(papers\.yaml:1\): "
            r"same arXiv id$",
        ),
        (
            GOOD.replace("https://github.com/microsoft/LoRA", "javascript:alert(1)"),
            r"^papers\.yaml:6: entry 'lora': code: 'javascript:alert\(1\)' is not an http\(s\):// link$",
        ),
        (
            GOOD.replace("tags: [Prefix tuning]", "tags: [Prefix tuning, Prefx]"),
            r"^papers\.yaml:16: entry 'prefix-tuning': tags: unknown tag\(s\) 'Prefx'; tags are defined in",
        ),
        (
            GOOD.replace("  impl: [lora]\n", "  impl: [lora]\n  venu: ICLR\n"),
            r"^papers\.yaml:9: entry 'lora': venu: unknown field \(did you mean 'venue'\?\)$",
        ),
        (
            GOOD.replace('title: "Prefix-Tuning: Optimizing', 'title: "prefix tuning --- optimizing'),
            None,
        ),  # a different title: not a duplicate
        (
            GOOD.replace(
                'title: "Prefix-Tuning: Optimizing Continuous Prompts for Generation"',
                'title: "LoRA -- low-rank adaptation of large language models!"',
            ),
            r"^papers\.yaml:12: entry 'prefix-tuning': title: same paper as entry 'lora' \(papers\.yaml:1\): "
            r"same title$",
        ),
        (
            GOOD.replace('arxiv: "2106.09685"', "arxiv: 2106.09680"),
            r"^papers\.yaml:5: entry 'lora': arxiv: must be a quoted string: YAML read 2106.0968 as a number$",
        ),
        (
            GOOD.replace('arxiv: "2106.09685"', 'arxiv: "2106.09685v2"'),
            r"^papers\.yaml:5: entry 'lora': arxiv: malformed arxiv '2106\.09685v2': expected an arXiv id",
        ),
        (
            GOOD.replace('acl: "2021.acl-long.353"', 'doi: "https://doi.org/10.1/x"'),
            r"^papers\.yaml:15: entry 'prefix-tuning': doi: malformed doi",
        ),
        (
            GOOD.replace("kind: method", "kind: metod", 1),
            r"^papers\.yaml:3: entry 'lora': kind: 'metod' is not one of: 'method', 'system'",
        ),
        (
            GOOD.replace("section: NLP / Methods", "section: NLP", 1),
            r"^papers\.yaml:4: entry 'lora': section: unknown section 'NLP'",
        ),
        (
            GOOD.replace("added: 2026-11-23", "added: yesterday", 1),
            r"^papers\.yaml:9: entry 'lora': added: must be a date written YYYY-MM-DD$",
        ),
        (
            GOOD.replace('  acl: "2021.acl-long.353"\n', ""),
            r"^papers\.yaml:11: entry 'prefix-tuning': a paper needs at least one identifier",
        ),
        (
            GOOD.replace(
                "  code: https://github.com/microsoft/LoRA\n", "  code: https://a.org\n  code: https://b.org\n"
            ),
            r"^papers\.yaml:7: entry 'lora': code: field given twice in one entry$",
        ),
        (
            GOOD.replace("- id: prefix-tuning", "- just a string\n- id: prefix-tuning"),
            r"^papers\.yaml:11: entry #2 is not a mapping of fields$",
        ),
    ],
)
def test_broken_copies_are_reported_with_file_and_line(broken, expected):
    _, problems = check(broken)
    found = messages(problems)
    if expected is None:
        assert found == []
    else:
        assert any(re.search(expected, message) for message in found), found


def test_all_problems_are_reported_at_once():
    broken = (
        GOOD.replace("https://github.com/microsoft/LoRA", "file:///etc/passwd")
        .replace("tags: [Prefix tuning]", "tags: [Nope]")
        .replace("id: prefix-tuning", "id: Prefix Tuning")
    )
    _, problems = check(broken)
    # The three mistakes, and the prompts module's claim on an entry no longer there.
    assert len(messages(problems)) == 4
    assert [problem.line for problem in problems] == sorted(problem.line for problem in problems)


def modules_with(slug: str, implements=(), covered_by=()):
    return {slug: ImplModule(slug, Path(f"reference_impls/{slug}.py"), "", tuple(implements), False, tuple(covered_by))}


def test_impl_declared_by_the_module_but_not_for_this_entry_warns():
    _, problems = check(GOOD, impls=modules(("lora", ("prefix-tuning",)), ("prompts", ("prefix-tuning",))))
    found = [str(problem) for problem in problems]
    assert (
        "papers.yaml:8: entry 'lora': impl: warning: reference_impls/lora.py does not confirm this link yet "
        "(the entry is not in the module's IMPLEMENTS)" in found
    )
    assert (
        "papers.yaml:17: entry 'prefix-tuning': impl: reference_impls/lora.py lists this entry in IMPLEMENTS; "
        "add 'lora'" in found
    )
    _, problems = check(GOOD, impls=modules(("lora", ("lora", "ghost")), ("prompts", ("prefix-tuning",))))
    assert messages(problems) == [
        "reference_impls/lora.py:0: IMPLEMENTS names 'ghost', which is not an entry of papers.yaml"
    ]


def test_links_say_what_they_are_and_both_sides_must_agree():
    survey = GOOD.replace("kind: method", "kind: survey", 1)  # lora becomes a survey of LoRA
    _, problems = check(
        survey, impls={**modules_with("lora", covered_by=("lora",)), **modules(("prompts", ("prefix-tuning",)))}
    )
    assert problems == []
    _, problems = check(
        survey, impls={**modules_with("lora", implements=("lora",)), **modules(("prompts", ("prefix-tuning",)))}
    )
    assert messages(problems) == [
        "papers.yaml:8: entry 'lora': impl: reference_impls/lora.py lists this survey in "
        "IMPLEMENTS; a survey belongs in COVERED_BY"
    ]
    _, problems = check(
        GOOD, impls={**modules_with("lora", covered_by=("lora",)), **modules(("prompts", ("prefix-tuning",)))}
    )
    assert messages(problems) == [
        "papers.yaml:8: entry 'lora': impl: reference_impls/lora.py lists this method in "
        "COVERED_BY; a method belongs in IMPLEMENTS"
    ]
    _, problems = check(GOOD, impls={**modules(("lora", ("lora",))), **modules_with("prompts", covered_by=("lora",))})
    assert (
        "papers.yaml:8: entry 'lora': impl: reference_impls/prompts.py lists this entry in COVERED_BY; "
        "add 'prompts'" in messages(problems)
    )


def test_an_entry_without_a_link_warns_and_fails_strict():
    unlinked = GOOD.replace("impl: [prompts]", "impl: []")
    for strict, severity in ((False, "warning"), (True, "error")):
        _, problems = check(unlinked, impls=modules(("lora", ("lora",))), strict=strict)
        assert [(str(problem), problem.severity) for problem in problems] == [
            (
                "papers.yaml:17: entry 'prefix-tuning': impl: "
                + ("warning: " if not strict else "")
                + "links to no reference implementation: name the module that implements it",
                severity,
            )
        ]


def test_missing_impl_warns_and_strict_impl_fails():
    _, problems = check(GOOD, impls={})
    assert [problem.severity for problem in problems] == ["warning", "warning"]
    assert "reference implementation 'lora' does not exist" in str(problems[0])
    _, problems = check(GOOD, impls={}, strict=True)
    assert [problem.severity for problem in problems] == ["error", "error"]


def test_paper_without_metadata_record_is_an_error():
    _, problems = check(GOOD, stored=("lora",))
    assert messages(problems) == [
        "papers.yaml:11: entry 'prefix-tuning': id: no metadata record in the store; "
        "run `catalog enrich` (or add it with `catalog add`)"
    ]


def test_paperless_tool_needs_no_record_but_a_link():
    tool = (
        GOOD + "\n- id: opendelta\n  title: OpenDelta\n  kind: framework\n  section: Frameworks and Tools\n"
        "  paper: false\n  tags: []\n  impl: [lora]\n  added: 2026-11-23\n"
    )
    impls = {
        **modules_with("lora", implements=("lora",), covered_by=("opendelta",)),
        **modules(("prompts", ("prefix-tuning",))),
    }
    _, problems = check(tool, impls=impls)
    assert messages(problems) == [
        "papers.yaml:20: entry 'opendelta': an entry without a paper needs a code or website link"
    ]
    _, problems = check(
        tool.replace("  paper: false\n", "  paper: false\n  website: https://opendelta.readthedocs.io/\n"), impls=impls
    )
    assert problems == []


def test_title_normalisation():
    assert normalise_title("VL-ADAPTER: Parameter-Efficient  Transfer") == normalise_title(
        "vl adapter parameter efficient transfer"
    )
    assert normalise_title("Goran Glavaš") == "goran glavas"


@pytest.mark.parametrize(
    "mutate, status", [(lambda text: text, 0), (lambda text: text.replace("kind: method", "kind: ???", 1), 1)]
)
def test_exit_status_of_the_command(repo_copy, mutate, status):
    papers = repo_copy / "papers.yaml"
    papers.write_text(mutate(papers.read_text()))
    result = subprocess.run([sys.executable, "-m", "catalog.cli", "check"], capture_output=True, text=True)
    assert result.returncode == status, result.stderr
    if status:
        assert re.search(
            r"^papers\.yaml:\d+: entry 'houlsby-adapter': kind: '\?\?\?' is not one of", result.stderr, re.M
        )


def test_unreadable_or_corrupt_files_fail_cleanly(repo_copy, capsys):
    (repo_copy / "catalog" / "metadata.json").write_text("{not json")
    assert main(["check"]) == 1
    assert "not a valid metadata store" in capsys.readouterr().err
    assert main(["--papers", "missing.yaml", "--store", "nowhere.json", "check"]) == 1
    assert "missing.yaml:0: cannot read" in capsys.readouterr().err


def test_insert_entry_into_a_section_without_entries_adds_its_header():
    import datetime

    from catalog.add import entry_block, insert_entry

    catalog = parse_catalog(GOOD, "papers.yaml")
    block = entry_block(
        {
            "id": "new-survey",
            "title": "A Survey",
            "kind": "survey",
            "section": "Surveys",
            "arxiv": "2401.00002",
            "tags": [],
            "impl": [],
            "added": datetime.date(2026, 11, 23),
        }
    )
    text = insert_entry(catalog, "Surveys", block)
    assert text.startswith(GOOD) and text.endswith("\n# ─── Surveys " + "─" * 63 + "\n\n" + block)
    assert [entry.id for entry in parse_catalog(text).entries] == ["lora", "prefix-tuning", "new-survey"]


OPENREVIEW_ONLY = GOOD.replace('  arxiv: "2106.09685"\n', '  openreview: "TwJrTz9cRS"\n')


def test_a_paper_known_only_by_its_openreview_id_is_valid_and_a_bad_one_is_named():
    catalog, problems = check(OPENREVIEW_ONLY)
    assert messages(problems) == [] and catalog.entries[0].identifiers == {"openreview": "TwJrTz9cRS"}
    _, problems = check(OPENREVIEW_ONLY.replace("TwJrTz9cRS", "https://openreview.net/forum?id=TwJrTz9cRS"))
    assert any(
        re.search(r"^papers\.yaml:5: entry 'lora': openreview: .*an OpenReview forum id", message)
        for message in messages(problems)
    ), messages(problems)
    # Two entries with the same OpenReview id are the same paper.
    twice = OPENREVIEW_ONLY + OPENREVIEW_ONLY.split("\n\n")[0].replace("id: lora", "id: lora-again").replace(
        '"LoRA: Low-Rank', '"Another title for LoRA: Low-Rank'
    )
    _, problems = check("\n" + twice + "\n", stored=("lora", "prefix-tuning", "lora-again"))
    assert any("same OpenReview id" in message for message in messages(problems)), messages(problems)


def test_a_record_from_gathered_facts_may_lack_its_paper_id_but_not_an_api_record(repo_copy, capsys):
    import json

    store_path = repo_copy / "catalog" / "metadata.json"
    data = json.loads(store_path.read_text())
    assert data["records"]["hira"]["source"] == "facts" and "paperId" not in data["records"]["hira"]["paper"]
    assert main(["check"]) == 0
    data["records"]["hira"]["source"] = "https://api.semanticscholar.org/graph/v1"
    store_path.write_text(json.dumps(data))
    assert main(["check"]) == 1
    assert "record 'hira': paper.paperId: a Semantic Scholar record needs its paper id" in capsys.readouterr().err
