"""The README's layout section names every module of the package and of callbacks/, and nothing else;
no module grows past ~500 lines without saying why at its top."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_entries() -> dict[str, str]:
    """{top-level entry or `r1lightning/<entry>`: its text, continuation lines included}."""
    block = re.search(r"## Layout\n\n```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    entries: dict[str, str] = {}
    parent, current = "", None
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        name = line.split()[0] if line.strip() else ""
        if indent == 0:
            parent = name if name.endswith("/") and len(line.split()) == 1 else ""
            current = name
        elif indent == 2:
            current = parent + name
        else:  # a continuation of the entry above
            entries[current] += " " + line.strip()
            continue
        entries[current] = line.strip()
    return entries


def py_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.py")}


def test_readme_layout_matches_the_tree():
    entries = layout_entries()
    package = ROOT / "r1lightning"
    top = {k[len("r1lightning/"):] for k in entries if k.startswith("r1lightning/") and k != "r1lightning/"}
    dirs = {p.name + "/" for p in package.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert top == py_files(package) | dirs
    for sub in sorted(dirs):
        named = set(re.findall(r"\b(\w+\.py)\b", entries["r1lightning/" + sub]))
        assert named <= py_files(package / sub), sub
        assert py_files(package / sub) - {"__init__.py"} <= named, sub
    named = set(re.findall(r"\b(\w+\.py)\b", entries["callbacks/"]))
    assert named == py_files(ROOT / "callbacks") - {"__init__.py"}


def test_long_modules_say_why_at_their_top():
    for path in sorted([*(ROOT / "r1lightning").rglob("*.py"), *(ROOT / "callbacks").glob("*.py")]):
        text = path.read_text()
        if text.count("\n") > 500:
            head = "\n".join(text.splitlines()[:40])
            assert re.search(r"(?i)over 500 lines|longer than 500 lines|\b\d{3} lines\b", head), \
                f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines without a stated reason at its top"
