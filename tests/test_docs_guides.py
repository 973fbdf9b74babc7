"""Every ```python block of the documentation's guides runs in CI.

The blocks of one page run in order, in one namespace (a later block uses what an
earlier one defined), in a fresh working directory, as the page shows them.  A block
whose fence is preceded by the line

    <!-- docs-test: skip REASON -->

is not run: a fragment, or something CI does not have (a GPU, a download).  The reason
is required and shows up in the docs' source.  Keep such blocks rare.

Pages whose blocks another test runs, with checks of its own, are listed in
``ELSEWHERE``; ``architecture.md`` is a design page, not a guide, and the API pages
(``docs/api/``) hold no code of their own.
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
ELSEWHERE = {"model_code.md": "tests/test_readme_model_code.py"}
NOT_GUIDES = {"architecture.md"}
SKIP = re.compile(r"<!-- docs-test: skip (?P<reason>\S.*?) -->")
GUIDES = sorted(p.name for p in DOCS.glob("*.md") if p.name not in NOT_GUIDES)


def blocks(page: str) -> list[tuple[str, str | None]]:
    """``(code, skip reason or None)`` of each ```python block of ``docs/<page>``."""
    text = (DOCS / page).read_text()
    found = []
    for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.M | re.S):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.fullmatch(before.strip())
        found.append((m.group(1), skip.group("reason") if skip else None))
    # an indented or otherwise unusual python fence would be missed silently
    assert text.count("```python") == len(found), f"{page}: a ```python fence not at column 0"
    return found


def test_every_guide_is_in_the_site_nav():
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    for page in [*GUIDES, *NOT_GUIDES]:
        assert f": {page}\n" in nav, f"docs/{page} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("page", GUIDES)
def test_the_guide_runs(page, tmp_path, monkeypatch, capsys):
    code = blocks(page)
    if page in ELSEWHERE:
        pytest.skip(f"run by {ELSEWHERE[page]}")
    if not code:
        return
    monkeypatch.chdir(tmp_path)  # files a page writes land here
    namespace: dict = {"__name__": f"docs_{page[:-3]}"}
    for i, (block, reason) in enumerate(code):
        if reason is None:
            exec(compile(block, f"docs/{page} (python block {i + 1})", "exec"), namespace)


def test_the_readme_quickstart_runs(tmp_path, monkeypatch):
    text = (DOCS.parent / "README.md").read_text()
    code = re.findall(r"^```python\n(.*?)^```$", text, flags=re.M | re.S)
    assert code, "the README's quickstart is gone"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_readme"}
    for i, block in enumerate(code):
        exec(compile(block, f"README.md (python block {i + 1})", "exec"), namespace)
    assert namespace["logits"].shape == (256, 10)


def test_ci_runs_the_readme_test_command():
    """.ci/run calls the README's test command verbatim (its second command line)."""
    readme = (DOCS.parent / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1).splitlines()
    test_command = commands[1].split("#")[0].strip()
    assert test_command.startswith("pip install -r requirements-test.txt")
    ci = (DOCS.parent / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]
