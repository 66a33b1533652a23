"""The docs stay true to the code: every page is reachable from the README, and every file, command,
make target and Python name they mention exists."""

import importlib
import re

import pytest

from rlhf.cli import parser
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TRACKED = ("rlhf/", "tasks/", "flows/", "tests/", "bench/", "docs/", ".ci/", "studies/", "data/")
TOP_FILES = {"params.yaml", "dvc.yaml", "Makefile", "pyproject.toml", "constraints.txt", "README.md"}


def mentions(page) -> list[str]:
    """Inline code spans and lines of code blocks."""
    text = page.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return inline + [line for b in blocks for line in b.splitlines()]


def test_the_readme_is_short_and_links_every_page_of_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme))
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_point_at_files_that_exist(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name}: link to {target}"


def _paths(text: str) -> list[str]:
    words = re.findall(r"(?<![\w./-])([\w.-]*/?[\w./-]+)", text)
    out = []
    for w in words:
        w = w.rstrip(".,:;)")
        if any(c in w for c in "<>*{}") or "NN" in w or w.startswith(("data/rounds", "bench/out", "studies/<")):
            continue
        if w in TOP_FILES or (w.startswith(TRACKED) and re.search(r"\.(py|md|yaml|json|jsonl|txt)$|/$", w)):
            out.append(w)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_project_file_named_exists(page):
    missing = [p for m in mentions(page) for p in _paths(m) if not (ROOT / p).exists()]
    assert missing == [], f"{page.name} names files that do not exist"


def _subcommands() -> dict[str, set[str]]:
    p = parser()
    sub = next(a for a in p._actions if a.dest == "command")
    out = {name: set() for name in sub.choices}
    for name, sp in sub.choices.items():
        for a in sp._actions:
            if getattr(a, "choices", None) and a.dest == "action":
                out[name] = set(a.choices)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_rlhf_command_and_make_target_named_exists(page):
    commands = _subcommands()
    makefile = (ROOT / "Makefile").read_text()
    for m in mentions(page):
        for cmd in re.findall(r"(?:^|[\s`(])(?:\.venv/bin/)?rlhf ([a-z_]+)(?: ([a-z]+))?", m):
            name, action = cmd
            assert name in commands, f"{page.name}: `rlhf {name}` is not a command"
            if commands[name] and action:  # a command with actions: `rlhf study run`
                assert action in commands[name], f"{page.name}: `rlhf {name} {action}`"
        for target in re.findall(r"(?:^|\s)make ([a-z-]+)", m):
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{page.name}: `make {target}`"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_name_named_exists(page):
    for m in mentions(page):
        for dotted in re.findall(r"\b((?:rlhf|tasks|flows)(?:\.\w+)+)\b", m):
            parts = dotted.split(".")
            for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for attr in parts[i:]:
                    assert hasattr(obj, attr), f"{page.name}: {dotted}"
                    obj = getattr(obj, attr)
                break
            else:
                pytest.fail(f"{page.name}: {dotted} does not import")


@pytest.mark.parametrize("name", ["wolf-mini", "cotrain-mini"])
def test_the_results_page_holds_the_report_of_the_shipped_study_file(name, monkeypatch):
    """docs/results.md's ranked table is the one in the kept report, which the shipped study file (its grid as it
    is now) wrote from every one of its runs."""
    from rlhf.studies.grid import load_study

    monkeypatch.chdir(ROOT)
    study = load_study(f"studies/{name}.yaml")
    kept = ROOT / "docs" / "results" / name
    report = (kept / "report.md").read_text()
    assert report.split("\n")[2].startswith(study.describe() + ". ")
    assert len((kept / "runs.csv").read_text().splitlines()) == 1 + len(study.runs)

    def ranked(text: str, after: str) -> list[str]:  # the first table of ranks after `after`
        return text[text.index("| rank |", text.index(after)) :].split("\n\n")[0].splitlines()

    page = (ROOT / "docs" / "results.md").read_text()
    assert ranked(page, f"`studies/{name}.yaml`") == ranked(report, "# Study")
