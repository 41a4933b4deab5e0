"""Stage 2b: the method-comparison table, computed from the reference implementations themselves.

reference_impls/_comparison.py applies each method with its paper's default configuration to a
BERT-base and a Llama-2-7B layout built on PyTorch's meta device and counts the trainable
parameters; this stage turns its rows into records for the page. Importing torch and transformers
is the slow part (a few seconds), so it happens only when the site is built.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Count:
    trainable: int | None  # None: the method does not apply to this layout
    percent: float | None


@dataclass(frozen=True)
class ComparisonRow:
    method: str
    impl: str  # slug of the implementation page
    configuration: str
    counts: tuple[Count, ...]  # one per layout, in COMPARISON layouts' order
    merges: bool
    longer_sequence: bool
    peft: str


@dataclass(frozen=True)
class Comparison:
    layouts: tuple[tuple[str, str, int], ...]  # (name, description, base model's parameters)
    rows: tuple[ComparisonRow, ...]


class ComparisonError(RuntimeError):
    pass


def method_comparison() -> Comparison:
    try:
        from reference_impls._comparison import LAYOUTS, compare
    except ImportError as error:  # torch or transformers missing: `make site` installs them
        raise ComparisonError(
            f"the comparison page needs the reference implementations' packages ({error.name}): "
            "pip install -e '.[reference]'"
        ) from None
    rows = compare()
    totals = rows[0].base_total if rows else {}
    return Comparison(
        tuple((layout.name, layout.description, totals.get(layout.name, 0)) for layout in LAYOUTS),
        tuple(
            ComparisonRow(
                row.method.name,
                row.method.impl,
                row.method.configuration,
                tuple(Count(row.trainable[layout.name], row.percent(layout.name)) for layout in LAYOUTS),
                row.method.merges,
                row.method.longer_sequence,
                row.method.peft,
            )
            for row in rows
        ),
    )
