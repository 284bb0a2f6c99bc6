"""No link leaves the repository: every relative link in the repository's markdown resolves inside it.

Links are read with markdown-it (CommonMark and tables), so code spans and fenced blocks are not taken
for links. A link with a scheme (``https:``, ``mailto:``) is not checked. A relative link must name a
file or folder that exists inside the repository (an absolute path or ``..`` out of it fails), and its
``#fragment``, when the target is markdown, must be a heading there (GitHub's anchors).

Code in the docs is checked too: a code span naming a repository path (``common/errors.py``, from the
repository root) names one that exists, and code and code spans import and run the components as
``meshserve.X`` (``from meshserve.clients import ...``, ``python -m meshserve.runtime``), never as ``X``.
"""

from __future__ import annotations

import pathlib
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator

import pytest
from conftest import REPO_ROOT
from markdown_it import MarkdownIt
from markdown_it.token import Token
from repository_files import repository_files

MARKDOWN = MarkdownIt("commonmark").enable("table")

# The folders that install as meshserve.<folder> (pyproject [tool.setuptools.package-dir]).
COMPONENTS = ("common", "protos", "runtime", "scheduler", "node_agent", "proxy", "clients")
_COMPONENT = "(?:" + "|".join(COMPONENTS) + ")"
BARE_IMPORT = re.compile(rf"(?:^|[\s;(])(?:from|import)\s+({_COMPONENT}(?:\.\w+)*)\b", re.MULTILINE)
BARE_RUN = re.compile(rf"python3?\s+-m\s+({_COMPONENT}(?:\.\w+)*)\b")
BARE_DOTTED = re.compile(rf"{_COMPONENT}(?:\.\w+)+")
REPOSITORY_PATH = re.compile(r"[\w.-]+(?:/[\w.-]+)+/?")


def markdown_files() -> list[pathlib.Path]:
    return [path for path in repository_files(REPO_ROOT) if path.suffix == ".md"]


def inline_tokens(tokens: list[Token]) -> Iterator[Token]:
    for token in tokens:
        yield token
        if token.children:
            yield from inline_tokens(token.children)


def links(text: str) -> list[str]:
    """Every link and image target in ``text`` (reference-style ones resolved by the parser)."""
    found = []
    for token in inline_tokens(MARKDOWN.parse(text)):
        target = token.attrGet("href") if token.type == "link_open" else \
            token.attrGet("src") if token.type == "image" else None
        if target is not None:
            found.append(str(target))
    return found


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(char for char in heading.strip().lower()
                   if char in " -_" or unicodedata.category(char)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of ``text``'s headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    tokens = MARKDOWN.parse(text)
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type == "heading_open":
            plain = "".join(child.content for child in inline.children or [] if child.type in ("text", "code_inline"))
            anchor, count = github_anchor(plain), 1
            unique = anchor
            while unique in found:
                unique, count = f"{anchor}-{count}", count + 1
            found.add(unique)
    return found


def problem(source: pathlib.Path, target: str) -> str | None:
    """Why ``target``, a link in the repository file ``source``, is broken; None when it resolves."""
    parsed = urllib.parse.urlsplit(target)
    if parsed.scheme or target.startswith("//"):
        return None  # a URL: not a path in the repository
    path, fragment = urllib.parse.unquote(parsed.path), urllib.parse.unquote(parsed.fragment)
    if path.startswith("/"):
        return "an absolute path; link relative to this file"
    resolved = ((REPO_ROOT / source).parent / path).resolve() if path else REPO_ROOT / source
    if not resolved.is_relative_to(REPO_ROOT):
        return f"leaves the repository ({resolved})"
    if not resolved.exists():
        return "names no file or folder"
    if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text()):
        return f"no heading #{fragment} in {resolved.relative_to(REPO_ROOT)}"
    return None


def stale_references(text: str, top_level: set[str]) -> list[str]:
    """Code in ``text`` naming a component without ``meshserve.``, or a repository path that does not exist.

    ``top_level`` holds the names at the repository root: a code span is taken for a repository path only
    when its first part is one of them (``examples/models``, not ``/dev/shm`` or ``../models``)."""
    stale = []
    for token in inline_tokens(MARKDOWN.parse(text)):
        if token.type not in ("code_inline", "fence", "code_block"):
            continue
        code = token.content
        stale += [f"{code.strip()!r}: import meshserve.{name}" for name in BARE_IMPORT.findall(code)]
        stale += [f"{code.strip()!r}: python -m meshserve.{name}" for name in BARE_RUN.findall(code)]
        if token.type != "code_inline":
            continue
        span = code.strip()
        if BARE_DOTTED.fullmatch(span) and not span.endswith(FILE_SUFFIXES):
            stale.append(f"{span!r}: write meshserve.{span}")
        if REPOSITORY_PATH.fullmatch(span) and span.split("/")[0] in top_level and not (REPO_ROOT / span).exists():
            stale.append(f"{span!r}: no such path in the repository")
    return stale


FILE_SUFFIXES = (".py", ".md", ".proto", ".pyi", ".yaml", ".toml", ".json", ".sh", ".pbtxt")


def top_level_names() -> set[str]:
    return {path.parts[0] for path in repository_files(REPO_ROOT)}


@pytest.mark.parametrize("source", markdown_files(), ids=str)
def test_code_in_the_docs_uses_meshserve_imports_and_existing_paths(source):
    stale = stale_references((REPO_ROOT / source).read_text(), top_level_names())
    assert not stale, f"{source}:\n  " + "\n  ".join(stale)


@pytest.mark.parametrize(("text", "why"), [
    ("```python\nfrom clients import InferenceClient\n```\n", "import meshserve.clients"),
    ("```python\nimport runtime.server\n```\n", "import meshserve.runtime.server"),
    ("    python -m scheduler serve\n", "python -m meshserve.scheduler"),
    ("errors are `protos.errors` types", "write meshserve.protos.errors"),
    ("see `protos/errors.py`", "no such path"),
])
def test_stale_code_is_named(text, why):
    assert any(why in stale for stale in stale_references(text, top_level_names()))


@pytest.mark.parametrize("text", [
    "```python\nfrom meshserve.clients import InferenceClient\nimport numpy as np\n```\n",
    "`python -m meshserve.runtime`, `common/errors.py`, `bench/proxy.py`, `proxy.py`, `../models`, `/dev/shm`",
    "`scheduler serve` and `scheduler ctl` are console scripts",
])
def test_current_code_passes(text):
    assert stale_references(text, top_level_names()) == []


@pytest.mark.parametrize("source", markdown_files(), ids=str)
def test_every_relative_link_resolves_inside_the_repository(source):
    broken = [f"{target}: {why}" for target in links((REPO_ROOT / source).read_text())
              if (why := problem(source, target))]
    assert not broken, f"{source}:\n  " + "\n  ".join(broken)


def test_the_repository_has_markdown_with_relative_links_to_check():
    checked = [target for source in markdown_files() for target in links((REPO_ROOT / source).read_text())
               if not urllib.parse.urlsplit(target).scheme]
    assert len(checked) >= 5, checked


@pytest.mark.parametrize(("target", "why"), [
    ("../outside.md", "leaves the repository"),
    ("/README.md", "an absolute path"),
    ("docs/missing.md", "names no file or folder"),
    ("docs/architecture.md#no-such-heading", "no heading #no-such-heading"),
    ("#no-such-heading", "no heading #no-such-heading"),
])
def test_a_broken_link_is_named(target, why):
    assert why in (problem(pathlib.Path("README.md"), target) or "")


@pytest.mark.parametrize("target", [
    "docs/architecture.md", "CONTRIBUTING.md", "bench/README.md", "examples/models", "https://example.org/x",
    "#call-it", "README.md#shared-memory-on-replicas",
])
def test_a_good_link_passes(target):
    assert problem(pathlib.Path("README.md"), target) is None


def test_links_in_code_are_not_links_and_reference_links_are():
    text = "`[a](../x)`\n\n```\n[b](../y)\n```\n\n[c][ref]\n\n[ref]: docs/z.md\n"
    assert links(text) == ["docs/z.md"]


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Shared memory on replicas", "shared-memory-on-replicas"),
    ("`bench/peers.py`", "benchpeerspy"),
    ("Set up and test", "set-up-and-test"),
    ("Faults and hostile input!", "faults-and-hostile-input"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_a_repeated_heading_gets_numbered_anchors():
    assert anchors("# A\n\n## A\n\n### A\n") == {"a", "a-1", "a-2"}
