"""The annotated implementation pages: every module cut into sections that cover the file, with its
equations rendered as MathML (reference_impls/README.md, "Notation")."""

import re

import pytest

from catalog.annotate import annotate, render_prose, to_latex
from catalog.impls import find_impls

from conftest import REPO

MODULES = sorted(find_impls(REPO / "reference_impls").items())


@pytest.mark.parametrize(("slug", "module"), MODULES, ids=[slug for slug, _ in MODULES])
def test_every_module_renders_with_all_equations_as_mathml(slug, module):
    source = module.path.read_text(encoding="utf-8")
    page = annotate(source)
    assert page.plain_equations == 0
    # The sections cover the file after the module docstring, in order, each line once.
    lines = source.splitlines()
    first_after_docstring = next(n for n, line in enumerate(lines, 1) if n > 1 and line.rstrip().endswith('"""')) + 1
    covered = [n for section in page.sections for n in range(section.first_line, section.last_line + 1)]
    assert covered == sorted(set(covered))
    code_lines = {n for n, line in enumerate(lines, 1) if n >= first_after_docstring and line.strip()}
    assert code_lines <= set(covered)
    assert len({section.anchor for section in page.sections}) == len(page.sections)


def test_sections_pair_docstrings_and_comments_with_their_code():
    source = '''"""Tiny: a method.

It computes

    h = W₀ x + s · B A x

with B ∈ ℝ^{d_out×r}.
"""

import torch

SCALE = 2  # a constant


# ---- The layer ----------
# Why the layer is built this way.
class Layer(torch.nn.Module):
    """The layer's docstring, with `code` and a list:

    - one
    - two
    """

    def forward(self, x):
        """Apply it."""
        return x * SCALE


def inject(model):
    return model
'''
    page = annotate(source)
    assert "Tiny: a method." not in page.method  # the summary is shown above the method, not twice
    assert page.method.count("<math") == 2 and 'display="block"' in page.method
    titles = [section.title for section in page.sections]
    assert titles == ["Module-level definitions", "The layer: class Layer", "Layer.forward", "def inject"]
    layer = page.sections[1]
    assert "Why the layer is built this way." in layer.prose and "<li>one</li>" in layer.prose
    assert "<code>code</code>" in layer.prose
    assert "The layer" not in layer.code and "docstring" not in layer.code  # prose is not repeated as code
    assert "class" in layer.code and "Layer" in layer.code
    forward = page.sections[2]
    assert "Apply it." in forward.prose and "SCALE" in forward.code and '"""' not in forward.code
    assert (forward.first_line, forward.last_line) == (23, 26)  # from the blank line above it
    assert page.sections[3].prose == ""


def test_plain_text_maths_becomes_latex():
    assert to_latex("W₀ ∈ ℝ^{d_out×d_in}") == r"W_{0} ∈ ℝ^{d_{\mathrm{out}}×d_{\mathrm{in}}}"
    assert to_latex("softmax(x)ᵀ") == r"\mathrm{softmax}(x)^{T}"
    assert r"\quad" in to_latex("h = x      s = 1")
    assert r"\text{(norm per output feature)}" in to_latex("m (norm per output feature)")
    assert to_latex("50% of #1") == r"50\% \mathrm{of} \#1"


def test_code_examples_stay_code_and_unreadable_maths_stays_text():
    html, plain = render_prose("Use it:\n\n    from x import y  # an import\n    y()\n")
    assert plain == 0 and "<math" not in html and 'class="highlight"' in html
    html, plain = render_prose("Broken:\n\n    x^\n")
    assert plain == 1 and '<pre class="aa-equation">' in html
    # Inline: a space-free token with ^{ or _{ is maths; one inside backticks stays code.
    html, _ = render_prose("B ∈ ℝ^{d_out×r}, and `x^{2}` stays.")
    assert html.count("<math") == 1 and "<code>x^{2}</code>" in html
    # A token that ends its paragraph (before </p>, after a colon) takes neither with it.
    html, _ = render_prose("one vector u ∈ ℝ^{d_in}:\n\n    H = 1")
    assert html.startswith("<p>one vector u ∈ <math") and "</math>:</p>" in html


def test_prose_is_escaped():
    html, _ = render_prose("A <script>alert(1)</script> & more")
    assert "<script>" not in html
    assert not re.search(r"<(?!/?(p|code|math|mi|mo|mn|mrow|msub|msup|em|strong)\b)", html)
