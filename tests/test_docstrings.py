"""Docstrings and comments point at the repository's own docs, never at a tracker or a file outside it.

Someone who clones the repository has ``docs/<page>.md`` (checked by ``tests/test_docs_links.py``) but neither
the design notes the project started from nor its issue tracker. So a docstring or comment of the code
folders, and the prose of the dataset-card texts, must not cite ``DESIGN`` sections or project issue numbers;
cite a ``docs/<page>.md#anchor`` instead, or say the thing itself.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterable
from pathlib import Path

from tests.test_docs_links import tracked_files

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pipelines", "xsam_model", "orchestrate", "tests", "bench", "scripts")

FORBIDDEN = re.compile(
    r"DESIGN\s*§"  # a section of the design notes, which are not in the repository
    r"|DESIGN\.md"
    # "issue 16", "Issue 20 item 4", "issues 5 and 7", "issue #3" — our tracker's numbers. Allowed: another
    # project's issue named as such, "issue 42 of LISA's repo" (the lookahead), and see ALLOWED below.
    r"|\b[Ii]ssues?\s+#?\d+\b(?!\s+of\s+\S+'s\b)"
    r"|\bissue-\d+"  # branch or file names such as issue-16
    # "(#12)" or "see #12"; "owner/repo#16" (an upstream tracker, e.g. zamling/PSALM#16) has a word or "/"
    # before the "#" and stays allowed
    r"|(?<![\w/&])#\d+\b"
)
# Stripped before matching: a URL may name an upstream bug (https://github.com/<owner>/<repo>/issues/123).
ALLOWED = re.compile(r"https?://\S+")


def problems_in(text: str) -> list[str]:
    """Each forbidden citation in ``text`` (a comment, a docstring or card prose), as it is written."""
    return [m.group(0) for m in FORBIDDEN.finditer(ALLOWED.sub("", text))]


_SKIP = {tokenize.NL, tokenize.COMMENT}
_LINE_START = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, None}


def prose_of_python(source: str) -> Iterable[tuple[int, str]]:
    """``(line, text)`` of every comment and every docstring-like string (a string that is a statement of its
    own: module, class and function docstrings, attribute docstrings) of a Python source."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)]
    significant = [t for t in tokens if t.type not in _SKIP]
    for t in tokens:
        if t.type == tokenize.COMMENT:
            yield t.start[0], t.string
    for i, t in enumerate(significant):
        if t.type != tokenize.STRING:
            continue
        before = significant[i - 1].type if i else None
        after = significant[i + 1].type if i + 1 < len(significant) else tokenize.ENDMARKER
        if before in _LINE_START and after in (tokenize.NEWLINE, tokenize.ENDMARKER):
            yield t.start[0], t.string


def citation_problems(root: Path, files: Iterable[str]) -> list[str]:
    """``path:line: text`` for each forbidden citation in the comments/docstrings of ``.py`` files and the
    prose of ``.md`` files among ``files`` (repository-relative)."""
    out = []
    for f in sorted(files):
        text = (root / f).read_text(encoding="utf-8")
        if f.endswith(".py"):
            pieces = list(prose_of_python(text))
        elif f.endswith(".md"):
            pieces = list(enumerate(text.splitlines(), 1))
        else:
            continue
        for line, piece in pieces:
            for bad in problems_in(piece):
                out.append(f"{f}:{line}: {bad!r}")
    return out


def test_code_cites_docs_not_design_sections_or_issue_numbers():
    # This file's own comments spell the forbidden forms out as examples, so it is not read.
    files = [
        f for f in tracked_files(ROOT) if f.split("/", 1)[0] in CODE_DIRS and f != "tests/test_docstrings.py"
    ]
    assert any(f.endswith(".md") for f in files)  # the dataset-card texts are checked too
    assert citation_problems(ROOT, files) == []


def test_checker_flags_citations_and_allows_other_projects():
    for bad in [
        "the Sample (DESIGN §4.3)",
        "see DESIGN.md",
        "bad inputs of issue 7",
        "Issue 20 item 4: the guard",
        "before issues 16 and 21",
        "as issue #3 asked",
        "fixed on branch issue-16",
        "the layout (#12)",
    ]:
        assert problems_in(bad), bad
    for ok in [
        "docs/contracts.md#sample",
        "what issue 42 of LISA's repo reports",
        "the refs file lost by the archive (zamling/PSALM#16)",
        "https://github.com/facebookresearch/segment-anything/issues/123",
        "colour #f5f5f5 and &#8230;",
        "2 issues were found",
        "layout of X-SAM's datas/ (docs/contracts.md#data-root)",
    ]:
        assert problems_in(ok) == [], ok


def test_only_comments_and_docstrings_are_read():
    source = (
        '"""Module docstring: issue 1."""\n'
        "X = 'a string in code: issue 2'\n"
        "# a comment: issue 3\n"
        "def f():\n"
        '    """Function docstring: issue 4."""\n'
        "    return call('issue 5')  # trailing comment: issue 6\n"
        "Y: int = 0\n"
        '"""Attribute docstring: issue 7."""\n'
    )
    found = [n for _, text in prose_of_python(source) for n in re.findall(r"issue (\d)", text)]
    assert sorted(found) == ["1", "3", "4", "6", "7"]
