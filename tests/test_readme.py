"""The README's promises: its test command is what CI runs, and both READMEs show the same two commands."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme_commands = bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    test_command = next(c for c in readme_commands if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_chinese_quick_start_is_linked_and_gives_the_same_two_commands():
    english = (ROOT / "README.md").read_text(encoding="utf-8")
    chinese = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    assert "(README.zh-CN.md)" in english.split("\n\n")[1]
    assert bash_blocks(english)[:2] == bash_blocks(chinese)[:2]
    assert "build_kernel.py --execute" in bash_blocks(english)[0]
