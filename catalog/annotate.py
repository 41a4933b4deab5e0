"""Stage 3a′: a reference implementation's source file as an annotated page: prose beside code.

The file is cut into sections the way it reads: the module docstring ("the method"), then each group
of top-level statements, each class (its header) and each of its methods, each function. A section's
prose is its docstring and the comment lines just above it, rendered as Markdown; its code is the
rest, highlighted. Every line of the file lands in exactly one section, so page and code cannot drift.

Equations are written in the docstrings in a notation that reads as plain text and renders as MathML
(reference_impls/README.md, "Notation"): display equations are the lines indented four spaces inside a
docstring (an indented block holding a `#` comment or an import is a code example instead); a
space-free token holding `^{` or `_{` in prose is inline math. Both are turned
into MathML at build time with latex2mathml (browsers render it natively; no script, no CDN).
"""

import ast
import html
import re
from dataclasses import dataclass, replace

import markdown
from latex2mathml.converter import convert as latex_to_mathml
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer


@dataclass(frozen=True)
class SourceSection:
    title: str  # "class LoRALinear", "LoRALinear.forward", "def inject_lora", or the file's own heading
    anchor: str
    prose: Markup  # HTML, from the docstring and the comments above
    code: Markup  # highlighted HTML
    first_line: int  # 1-based, inclusive
    last_line: int


@dataclass(frozen=True)
class AnnotatedSource:
    method: Markup  # the module docstring, as HTML
    sections: tuple[SourceSection, ...]
    plain_equations: int  # display equations that could not be turned into MathML (shown as text)


# ---- maths --------------------------------------------------------------------------------------------

SUBSCRIPTS = str.maketrans("₀₁₂₃₄₅₆₇₈₉ₐₑₒₓₕₖₗₘₙₚₛₜᵢⱼ", "0123456789aeoxhklmnpstij")
SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹ⁿⁱ⁻⁺", "0123456789ni-+")
LATEX_SPECIAL = {"%": r"\%", "#": r"\#", "&": r"\&", "$": r"\$", "~": r"\sim ", "\\": r"\backslash "}


def to_latex(text: str) -> str:
    """Our plain-text maths as LaTeX: Unicode sub- and superscripts as scripts, words upright, long
    gaps as quads, a parenthesised remark (one with a word of three letters) as text."""
    remarks: list[str] = []

    def remark(match: re.Match) -> str:
        remarks.append(match.group(0))
        return f"\x00{len(remarks) - 1}\x00"

    text = re.sub(r"\((?=[^()]*[A-Za-z]{3})[^()]*\)", remark, text)
    text = "".join(LATEX_SPECIAL.get(character, character) for character in text)
    text = re.sub(r"[₀-₉ₐₑₒₓₕₖₗₘₙₚₛₜᵢⱼ]+", lambda m: "_{" + m.group(0).translate(SUBSCRIPTS) + "}", text)
    text = re.sub(r"[⁰-⁹ⁿⁱ⁻⁺¹²³]+", lambda m: "^{" + m.group(0).translate(SUPERSCRIPTS) + "}", text)
    text = text.replace("ᵀ", "^{T}")
    text = re.sub(r"_([A-Za-z][A-Za-z0-9]+)", r"_{\\mathrm{\1}}", text)  # d_out → d_{out}
    text = re.sub(r"(?<![\\A-Za-z{])([A-Za-z]{2,})(?![A-Za-z}])", r"\\mathrm{\1}", text)  # softmax, LN, merge
    text = re.sub(r" {3,}", r" \\quad ", text)
    return re.sub("\x00(\\d+)\x00", lambda m: r"\text{" + remarks[int(m.group(1))].replace("\\", "") + "}", text)


def mathml(text: str, display: bool) -> Markup | None:
    """MathML for one equation or inline token, or None if it cannot be read as maths."""
    try:
        converted = latex_to_mathml(to_latex(text), display="block" if display else "inline")
    except Exception:  # latex2mathml raises many kinds of error on what is not LaTeX: show the text instead
        return None
    return Markup(converted)


# A token ends at white space or at a tag (`ℝ^{d_in}:` closing a paragraph is followed by `</p>`).
INLINE = re.compile(r"(?<![\w`])([^\s`<]*[\^_]\{[^\s`<]*?)(?=[,.;:)]*(?:\s|<|$))")


def _inline_maths(paragraph_html: str) -> str:
    """Inline tokens such as ℝ^{d_out×d_in} in rendered prose (outside code) as MathML."""
    parts = re.split(r"(<code>.*?</code>)", paragraph_html, flags=re.S)
    for index in range(0, len(parts), 2):
        parts[index] = INLINE.sub(lambda m: str(mathml(html.unescape(m.group(1)), False) or m.group(1)), parts[index])
    return "".join(parts)


# ---- prose -----------------------------------------------------------------------------------------------

FORMATTER = HtmlFormatter(nowrap=True)  # Pygments' spans only: the templates supply <pre><code>


def _markdown() -> markdown.Markdown:
    """Markdown without raw HTML: a `<` in a docstring is text, as it is in the source."""
    converter = markdown.Markdown(extensions=["sane_lists"], output_format="html")
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    return converter


def render_prose(text: str) -> tuple[Markup, int]:
    """A docstring (or comment text) as HTML: Markdown, with its indented blocks as display maths.
    Returns the HTML and how many display equations stayed plain text."""
    text = text.strip("\n")
    blocks, plain = [], 0
    lines, output, index = text.split("\n"), [], 0
    while index < len(lines):
        if lines[index].startswith("    ") and lines[index].strip():
            block = []
            while index < len(lines) and lines[index].startswith("    ") and lines[index].strip():
                block.append(lines[index].strip())
                index += 1
            if any(" # " in line or line.startswith(("#", ">>>", "import ", "from ")) for line in block):
                # A usage example, not maths: a block that holds a Python comment or import is code.
                code = highlight("\n".join(block) + "\n", PythonLexer(), FORMATTER)
                blocks.append(f'<div class="highlight"><pre><code>{code}</code></pre></div>')
            else:
                rendered = [mathml(line, True) for line in block]
                plain += sum(1 for piece in rendered if piece is None)
                blocks.append(
                    "".join(
                        str(piece) if piece is not None else f'<pre class="aa-equation">{html.escape(line)}</pre>'
                        for piece, line in zip(rendered, block)
                    )
                )
            output += ["", f"AAMATHBLOCK{len(blocks) - 1}", ""]
        else:
            output.append(lines[index])
            index += 1
    rendered = _markdown().convert("\n".join(output))
    rendered = _inline_maths(rendered)
    for number, block in enumerate(blocks):
        rendered = rendered.replace(f"<p>AAMATHBLOCK{number}</p>", f'<div class="aa-display">{block}</div>')
    return Markup(rendered), plain


# ---- sections ------------------------------------------------------------------------------------------

HEADING = re.compile(r"#\s*-{2,}\s*(.*?)\s*-*\s*$")  # "# ---- Polytropon and MHR -----" names what follows


def _docstring_lines(node: ast.AST) -> tuple[str, range] | None:
    """(the docstring, its line range) of a module, class or function node, if it has one."""
    body = getattr(node, "body", [])
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        return ast.get_docstring(node, clean=True) or "", range(body[0].lineno, body[0].end_lineno + 1)
    return None


@dataclass(frozen=True)
class _Chunk:
    title: str
    first: int  # the first line of its code (decorators included)
    last: int
    docstring: str | None
    doc_lines: range  # the docstring's lines, shown as prose rather than code


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])


def _chunk(title: str, node: ast.stmt, first: int, last: int) -> _Chunk:
    doc = _docstring_lines(node)
    return _Chunk(title, first, last, doc[0] if doc else None, doc[1] if doc else range(0))


def _statements(nodes: list[ast.stmt], title: str) -> _Chunk:
    return _Chunk(title, min(_first_line(n) for n in nodes), max(n.end_lineno for n in nodes), None, range(0))


def _chunks(body: list[ast.stmt]) -> list[_Chunk]:
    """A file's top level as chunks: each run of plain statements, each function, each class (its
    header: the class line, docstring and the statements before its first method), each method, and
    each run of class statements between or after methods."""
    chunks: list[_Chunk] = []
    pending: list[ast.stmt] = []

    def flush(title_of):
        if pending:
            chunks.append(_statements(pending, title_of(pending)))
            pending.clear()

    def top_title(nodes):
        imports_only = all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes)
        return "Imports" if imports_only else "Module-level definitions"

    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in body:
        if isinstance(node, functions):
            flush(top_title)
            chunks.append(_chunk(f"def {node.name}", node, _first_line(node), node.end_lineno))
        elif isinstance(node, ast.ClassDef):
            flush(top_title)
            methods = [n for n in node.body if isinstance(n, functions)]
            before = [n for n in node.body if not methods or n.lineno < methods[0].lineno]
            header_end = max([node.lineno] + [n.end_lineno for n in node.bases + node.keywords + before])
            chunks.append(_chunk(f"class {node.name}", node, _first_line(node), header_end))
            for member in node.body[len(before) :]:
                if isinstance(member, functions):
                    flush(lambda _: f"{node.name} (class attributes)")
                    chunks.append(_chunk(f"{node.name}.{member.name}", member, _first_line(member), member.end_lineno))
                else:
                    pending.append(member)
            flush(lambda _: f"{node.name} (class attributes)")
        else:
            pending.append(node)
    flush(top_title)
    return chunks


def annotate(source: str) -> AnnotatedSource:
    """The annotated page of one Python file."""
    tree = ast.parse(source)
    lines = source.splitlines()
    module_doc = _docstring_lines(tree)
    # The docstring's first paragraph is the page's summary, shown above "The method": not twice.
    method_text = module_doc[0].split("\n\n", 1)[1] if module_doc and "\n\n" in module_doc[0] else ""
    method, plain = render_prose(method_text) if method_text else (Markup(""), 0)

    sections, previous_end = [], module_doc[1].stop - 1 if module_doc else 0
    for chunk in _chunks(tree.body[1:] if module_doc else tree.body):
        # The comment lines (and blank lines) between the previous chunk and this one are its prose;
        # a "# ---- heading ----" line among them names the section.
        start = chunk.first
        while start - 1 > previous_end and (not lines[start - 2].strip() or lines[start - 2].lstrip().startswith("#")):
            start -= 1
        comments, heading = [], None
        for text in (lines[number - 1].strip() for number in range(start, chunk.first)):
            if HEADING.fullmatch(text):
                heading = HEADING.fullmatch(text).group(1) or heading
            elif text.startswith("#"):
                comments.append(text.lstrip("#").strip())
        prose_text = "\n".join(filter(None, [" ".join(comments), chunk.docstring]))
        prose, unconverted = render_prose(prose_text) if prose_text else (Markup(""), 0)
        plain += unconverted
        code_lines = [lines[n - 1] for n in range(chunk.first, chunk.last + 1) if n not in chunk.doc_lines]
        while code_lines and not code_lines[-1].strip():
            code_lines.pop()
        code = Markup(highlight("\n".join(code_lines) + "\n", PythonLexer(), FORMATTER))
        if not heading:
            title = chunk.title
        elif chunk.title in ("Imports", "Module-level definitions"):
            title = heading
        else:
            title = f"{heading}: {chunk.title}"
        anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
        sections.append(SourceSection(title, anchor, prose, code, start, chunk.last))
        previous_end = chunk.last
    return AnnotatedSource(method, _unique_anchors(sections), plain)


def _unique_anchors(sections: list[SourceSection]) -> tuple[SourceSection, ...]:
    """Number repeated anchors (two classes may both have a `forward`): forward, forward-2, ..."""
    seen: dict[str, int] = {}
    unique = []
    for section in sections:
        count = seen.get(section.anchor, 0)
        seen[section.anchor] = count + 1
        unique.append(replace(section, anchor=f"{section.anchor}-{count + 1}") if count else section)
    return tuple(unique)
