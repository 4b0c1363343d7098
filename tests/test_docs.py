"""The documentation keeps up with the code: docs/cli.md names every command and flag the parsers define,
README.md and docs/cli.md name every make target, README.md stays short, every relative link resolves,
and docs/performance.md names measurements by what they measure, not by issue numbers."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_MD = DOCS / "cli.md"
PERFORMANCE_MD = DOCS / "performance.md"
README_MAX_LINES = 200


def _text(path: Path) -> str:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# 1. every command and flag of the parsers is in docs/cli.md


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from pipeline.cli import build_parser

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1, "pipeline.cli.build_parser() should have exactly one set of subcommands"
    return dict(actions[0].choices)


def _train_vae_parser() -> argparse.ArgumentParser:
    import train_vae

    return train_vae.build_parser()


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string a user can type, help and suppressed (internal) flags left out."""
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
            continue
        out.extend(action.option_strings)
    return out


def _named(text: str, literal: str) -> bool:
    """``literal`` occurs in ``text`` as a whole token: ``-w`` is not found inside ``--workers`` or ``-wx``."""
    return re.search(rf"(?<![\w-]){re.escape(literal)}(?![\w-])", text) is not None


COMMANDS = sorted(_subparsers())


@pytest.mark.parametrize("command", [*COMMANDS, "train_vae.py"])
def test_cli_md_names_every_flag_of_the_command(command):
    parser = _train_vae_parser() if command == "train_vae.py" else _subparsers()[command]
    text = _text(CLI_MD)
    options = _option_strings(parser)
    missing = sorted({opt for opt in options if not _named(text, opt)})
    assert not missing, f"docs/cli.md does not name these flags of {command}: {', '.join(missing)}"


def test_the_parsers_have_the_commands_and_flags_that_the_docs_test_relies_on():
    # So that a parser change which the tests above would silently skip (no subcommands, no flags) shows.
    assert {"fetch", "train", "demo", "serve", "verify", "stats", "clean-cache", "upload"} <= set(COMMANDS)
    assert "--max-in-flight" in _option_strings(_subparsers()["fetch"])
    assert _option_strings(_subparsers()["train"]) == _option_strings(_train_vae_parser())


def _headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6}\s", line)]


def _table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("|")]


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_md_has_every_command_as_a_heading_or_in_a_table(command):
    text = _text(CLI_MD)
    places = [*_headings(text), *_table_rows(text)]
    assert any(_named(place, command) for place in places), (
        f"docs/cli.md has no heading or table row naming the command {command!r}"
    )


# ---------------------------------------------------------------------------------------------------------
# 2. every make target is in README.md and docs/cli.md


def _phony_targets() -> list[str]:
    makefile = _text(ROOT / "Makefile")
    lines = [line for line in makefile.splitlines() if line.startswith(".PHONY:")]
    assert lines, "the Makefile has no .PHONY: line"
    targets = [t for line in lines for t in line.split(":", 1)[1].split()]
    assert targets, "the Makefile's .PHONY: line names no targets"
    return targets


@pytest.mark.parametrize("doc", ["README.md", "docs/cli.md"])
def test_every_make_target_is_documented(doc):
    text = _text(ROOT / doc)
    missing = [t for t in _phony_targets() if not _named(text, f"make {t}")]
    assert not missing, f"{doc} does not name these make targets (as `make TARGET`): {', '.join(missing)}"


# ---------------------------------------------------------------------------------------------------------
# 3. README.md is short, and every relative link resolves

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _markdown_files() -> list[Path]:
    files = [README, *sorted(DOCS.glob("*.md"))]
    return [f for f in files if f.is_file()]


def test_readme_is_at_most_200_lines():
    n = len(_text(README).splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail into docs/"


def test_the_docs_pages_exist():
    expected = ["architecture.md", "cli.md", "cluster.md", "formats.md", "guarantees.md", "performance.md"]
    missing = [name for name in expected if not (DOCS / name).is_file()]
    assert not missing, f"docs/ lacks {', '.join(missing)}"
    readme = _text(README)
    unlinked = [name for name in expected if f"(docs/{name}" not in readme]
    assert not unlinked, f"README.md does not link these docs pages: {', '.join(unlinked)}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _headings(path.read_text(encoding="utf-8")):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # links in code blocks are not links
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z][a-z0-9+.-]*:", m.group(1), re.I)]


@pytest.mark.parametrize("doc", [str(p.relative_to(ROOT)) for p in _markdown_files()])
def test_every_relative_link_points_to_an_existing_file(doc):
    path = ROOT / doc
    broken = []
    for link in _relative_links(path):
        target, _, anchor = link.partition("#")
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            broken.append(f"{link} (no file {target})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{link} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{doc} has broken links: {'; '.join(broken)}"


def test_the_link_checker_finds_links():
    # A regex that matched nothing would let every link test pass.
    assert "docs/cli.md" in _relative_links(README)
    assert _slug("`tess fetch`") == "tess-fetch"
    assert _slug("Streaming training (`--source s3`) against S3MapDataset") == (
        "streaming-training---source-s3-against-s3mapdataset"
    )


# ---------------------------------------------------------------------------------------------------------
# 4. docs/performance.md names no issue numbers

ISSUE = re.compile(r"\bissues?\s*#?\s*\d+", re.I)


def test_performance_md_mentions_no_issue_numbers():
    text = _text(PERFORMANCE_MD)
    found = [m.group(0) for m in ISSUE.finditer(text)]
    found += [h for h in _headings(text) if re.search(r"#\d+", h)]
    assert not found, f"docs/performance.md names issue numbers (name a section by what it measures): {found}"
