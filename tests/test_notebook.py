import ast
import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

import build_kernel
from build_kernel import MAX_CELL_LINES, BuildError, build_notebook, notebook_text, stitch
from kernel import NOTEBOOK_SECTIONS
from kernel.bundled_configs import BUNDLED_CONFIGS
from kernel.config import Config, all_keys, get_key, load_config
from kernel.distributed import SECTION_MARKER_PATTERN
from kernel.env import KernelError

ROOT = Path(__file__).resolve().parent.parent
TINY_OVERRIDES = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
                  "train.max_steps": 30, "train.eval_interval": 15, "train.eval_batches": 2,
                  "train.device": "cpu", "train.dtype": "float32", "train.warmup_steps": 5, "train.lr": 3e-3,
                  "sample.max_new_tokens": 30}


def code_cells(notebook):
    return [c for c in notebook["cells"] if c["cell_type"] == "code"]


def test_committed_notebook_is_fresh():
    result = subprocess.run([sys.executable, "build_kernel.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_stale_notebook(tmp_path, monkeypatch):
    stale = tmp_path / "stale.ipynb"
    stale.write_text((ROOT / build_kernel.NOTEBOOK).read_text().replace("Train a GPT", "Train a GTP"))
    monkeypatch.setattr(build_kernel, "NOTEBOOK", stale)
    assert build_kernel.main(["--check"]) == 1


def test_build_is_deterministic_valid_and_self_contained():
    first, second = notebook_text(build_notebook()), notebook_text(build_notebook())
    assert first == second
    notebook = nbformat.reads(first, as_version=4)
    nbformat.validate(notebook)
    ids = [c["id"] for c in notebook.cells]
    assert len(set(ids)) == len(ids) and "parameters" in ids and "model-code" in ids
    assert all(c.outputs == [] and c.execution_count is None for c in notebook.cells if c.cell_type == "code")
    for c in code_cells(json.loads(first)):
        source = "".join(c["source"])
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m.split(".")[0] == "kernel" for m in modules), source[:80]
        assert "__file__" not in source and "__main__" not in source


def test_first_cells_are_title_contents_settings_and_a_literal_parameters_cell():
    cells = build_notebook()["cells"]
    assert cells[0]["cell_type"] == "markdown" and cells[0]["source"][0].startswith("# Train a GPT")
    contents, settings, params = ("".join(c["source"]) for c in cells[1:4])
    assert contents.startswith("## Contents") and "[Run](#Run)" in contents
    assert all(f"[{s.doc.splitlines()[0][3:]}]" in contents for s in stitch(ROOT))  # every section is listed
    assert cells[3]["cell_type"] == "code" and cells[3]["metadata"]["tags"] == ["parameters"]
    names = {}
    for node in ast.parse(params).body:
        names[node.targets[0].id] = ast.literal_eval(node.value)
    assert names == {"CONFIG": "auto", "DATA_GLOB": "", "OVERRIDES": {}, "OUT_DIR": ""}
    assert settings.startswith("## What to change") and all(f"`{name}`" in settings for name in names)


def test_the_settings_table_lists_every_key_with_its_default_and_the_presets_values():
    settings = "".join(build_notebook()["cells"][2]["source"])
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ") for line in settings.splitlines()
            if line.startswith("| `") and "." in line.split(" | ")[0]}
    assert set(rows) == set(all_keys())
    defaults = Config()
    gpu, cpu = (("llm_kaggle_t4.yaml", load_config("llm_kaggle_t4.yaml")), ("llm_cpu.yaml", load_config("llm_cpu.yaml")))
    for key, (_, default, on_gpu, on_cpu, help_text) in rows.items():
        assert default == (f"`{get_key(defaults, key)!r}`" if get_key(defaults, key) is not None else "`null`"), key
        for (name, preset), cell in ((gpu, on_gpu), (cpu, on_cpu)):
            if get_key(preset, key) == get_key(defaults, key):
                assert cell == "", (key, cell)
            else:  # the value shown, given as an override, is the preset's ("8h" for a duration)
                shown = ast.literal_eval(cell.strip("`"))
                assert get_key(load_config(name, {key: shown}), key) == get_key(preset, key), (key, cell)
        assert help_text.strip(" |"), f"{key} has no help text: give its field a comment in kernel/config.py"


def test_code_cells_are_of_a_readable_size_and_the_library_is_folded():
    cells = build_notebook()["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert max(len(c["source"]) for c in code) <= MAX_CELL_LINES
    library = [c for c in code if SECTION_MARKER_PATTERN.match(c["source"][0].rstrip("\n"))]
    assert all(c["metadata"]["jupyter"] == {"source_hidden": True} for c in library)
    numbers = [int(SECTION_MARKER_PATTERN.match(c["source"][0].rstrip("\n"))[1]) for c in library]
    assert numbers == list(range(1, len(library) + 1))
    shown = [c["id"] for c in code if c not in library]
    assert shown == ["parameters", "run", "sample-more"]
    text = "".join("".join(c["source"]) for c in cells)
    assert "argparse" not in text and "--nnodes" not in text  # the command line is not the notebook's


def test_sections_follow_the_package_order_and_configs_are_bundled():
    sections = stitch(ROOT)
    assert [s.name for s in sections] == NOTEBOOK_SECTIONS
    bundled = next(s for s in sections if s.name == "bundled_configs")
    namespace = {}
    exec(bundled.code, namespace)
    assert namespace["BUNDLED_CONFIGS"] == BUNDLED_CONFIGS


def make_package(root: Path, modules: dict[str, str]) -> Path:
    (root / "kernel").mkdir()
    (root / "configs").mkdir()
    order = list(modules)
    (root / "kernel" / "__init__.py").write_text(f"NOTEBOOK_SECTIONS = {order!r}\n")
    for name, source in modules.items():
        (root / "kernel" / f"{name}.py").write_text(textwrap.dedent(source))
    return root


@pytest.mark.parametrize("modules, message", [
    ({"a": "def f(): pass\n", "b": "def f(): pass\n"}, "binds 'f'"),
    ({"a": "X = 1\n", "b": "from kernel.a import Y\n"}, "kernel.a defines no 'Y'"),
    ({"a": "from kernel.b import g\n", "b": "def g(): pass\n"}, "not an earlier notebook section"),
    ({"a": "if __name__ == '__main__':\n    pass\n"}, "__name__"),
    ({"a": "HERE = __file__\n"}, "__file__"),
    ({"a": "from .b import g\n", "b": "def g(): pass\n"}, "no relative imports"),
    ({"a": "import kernel.b\n", "b": "def g(): pass\n"}, "cannot be stitched"),
    ({"a": "from kernel.b import g as h\n", "b": "def g(): pass\n"}, "no `as`"),
    ({"a": "from __future__ import annotations\n"}, "__future__"),
    ({"a": "import numpy as np\n", "b": "np = 3\n"}, "binds 'np'"),
])
def test_build_fails_on_what_would_break_one_namespace(tmp_path, modules, message):
    with pytest.raises(BuildError, match=message):
        stitch(make_package(tmp_path, modules))


def test_build_fails_on_an_unlisted_module(tmp_path):
    root = make_package(tmp_path, {"a": "X = 1\n"})
    (root / "kernel" / "extra.py").write_text("Y = 2\n")
    with pytest.raises(BuildError, match="neither NOTEBOOK_SECTIONS nor COMMAND_LINE_ONLY lists"):
        stitch(root)
    (root / "kernel" / "__init__.py").write_text("NOTEBOOK_SECTIONS = ['a']\nCOMMAND_LINE_ONLY = ['extra']\n")
    assert [s.name for s in stitch(root)] == ["a"]  # the command line's module stays out of the notebook


def test_a_module_is_cut_into_cells_at_its_part_headings_and_long_cells_fail(tmp_path):
    part = "".join(f"X{i} = {i}\n" for i in range(200))
    source = f'"""## 2. A"""\n{part}\n# --- Second part ---\n{part.replace("X", "Y")}'
    root = make_package(tmp_path, {"distributed": DISTRIBUTED, "a": source})
    cells = build_notebook(root)["cells"]
    a_cells = [c for c in cells if c["id"].startswith("a")]
    assert [c["id"] for c in a_cells] == ["a-doc", "a-code", "a-2-doc", "a-2-code"]
    assert a_cells[2]["source"] == ["### Second part"] and a_cells[3]["source"][1] == "Y0 = 0\n"
    (root / "kernel" / "a.py").write_text(f'"""## 2. A"""\n{part}{part.replace("X", "Y")}')
    with pytest.raises(BuildError, match=r"kernel/a.py \(its first part\) makes a code cell of 401 lines"):
        build_notebook(root)


def test_multi_line_imports_are_removed_whole(tmp_path):
    root = make_package(tmp_path, {"a": "def f(): pass\ndef g(): pass\n",
                                   "b": '"""Doc."""\nfrom kernel.a import (\n    f,\n    g,\n)\nimport math\nY = f\n'})
    b = stitch(root)[1]
    assert b.doc == "Doc." and b.code == "import math\nY = f"


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path):
    notebook = json.loads((ROOT / build_kernel.NOTEBOOK).read_text())
    out = tmp_path / "out"
    executed = build_kernel.execute_notebook(notebook, tmp_path, {"OVERRIDES": TINY_OVERRIDES, "OUT_DIR": str(out)},
                                             timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["device"] == "cpu" and summary["val_loss"] < 3.6
    assert {"samples.txt", "metrics.jsonl", "config.yaml", "checkpoints", "tokenizer"} <= {p.name for p in out.iterdir()}
    printed = "".join("".join(o.get("text", "")) for c in code_cells(executed) for o in c["outputs"])
    assert "[done] val loss" in printed and "demo corpus" in printed
    last = "".join("".join(o.get("text", "")) for o in code_cells(executed)[-1]["outputs"])
    assert "=== sample 1 | prompt '\\n' ===" in last and "=== sample 2 | prompt 'The ' ===" in last


class RecordingClient:
    """Stands in for nbclient's NotebookClient: records the cell timeout it is given, runs nothing."""
    timeouts = []

    def __init__(self, nb, timeout, **_):
        self.timeouts.append(timeout)

    def execute(self):
        pass


def test_execute_sets_no_cell_timeout_unless_asked(tmp_path, monkeypatch):
    import nbclient

    monkeypatch.setattr(nbclient, "NotebookClient", RecordingClient)
    monkeypatch.setattr(RecordingClient, "timeouts", [])
    monkeypatch.setattr(build_kernel, "NOTEBOOK", tmp_path / "train_gpt.ipynb")  # the committed one stays as it is
    out = f"OUT_DIR={str(tmp_path / 'out')!r}"
    assert build_kernel.main(["--execute", "--param", out]) == 0
    assert build_kernel.main(["--execute", "--param", out, "--timeout", "7200"]) == 0
    assert RecordingClient.timeouts == [None, 7200]  # None: nbclient waits as long as a cell runs


@pytest.mark.slow
def test_bad_input_in_the_notebook_is_one_block_not_a_traceback(tmp_path):
    """The same error the command line prints as one `error:` line: in a notebook, the message and a hint."""
    notebook = json.loads((ROOT / build_kernel.NOTEBOOK).read_text())
    out = tmp_path / "out"
    with pytest.raises(Exception) as raised:  # nbclient's CellExecutionError, carrying the cell's error output
        build_kernel.execute_notebook(notebook, tmp_path, {"OVERRIDES": {"train.lernin_rate": 1}, "OUT_DIR": str(out)},
                                      timeout=300)
    shown = str(raised.value)
    assert "ConfigError: " in shown and "train.lernin_rate" in shown and "%env KERNEL_TRACEBACK=1" in shown
    assert "Traceback" not in shown and "File " not in shown and "kernel section" not in shown
    assert not out.exists() or not any(out.iterdir())  # nothing was written


def test_a_kernel_error_in_ipython_is_its_message_and_the_traceback_comes_on_request(tmp_path, monkeypatch, capsys):
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config as ShellConfig

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    settings = ShellConfig()
    settings.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=settings)
    try:
        code = "from kernel.config import load_config\ndef deep():\n    load_config(None, {'train.lernin_rate': 1})\ndeep()"
        shell.run_cell(code)
        short = capsys.readouterr().out
        monkeypatch.setenv("KERNEL_TRACEBACK", "1")
        shell.run_cell("deep()")
        full = capsys.readouterr().out
    finally:
        InteractiveShell.clear_instance()
    assert short.splitlines()[0].startswith("ConfigError: --set: unknown key 'train.lernin_rate'")
    assert len(short.strip().splitlines()) == 2 and "Traceback" not in short
    assert "Traceback (most recent call last)" in full and "in deep" in full and "ConfigError: --set: unknown key" in full


@pytest.mark.slow
def test_headless_cli_runs_and_reports_bad_input(tmp_path):
    sets = [arg for key, value in TINY_OVERRIDES.items() for arg in ("--set", f"{key}={value}")]
    done = subprocess.run([sys.executable, "-m", "kernel", "--config", "configs/llm_cpu.yaml", *sets,
                           "--out", str(tmp_path / "cli")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["params"] > 0
    sampled = subprocess.run([sys.executable, "-m", "kernel", "sample", str(tmp_path / "cli" / "checkpoints" /
                              "ckpt_00000030.pt"), "--prompt", "def ", "--max-new-tokens", "12"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0 and "prompt 'def '" in sampled.stdout
    bad = subprocess.run([sys.executable, "-m", "kernel", "--set", "model.n_layr=2", "--out", str(tmp_path / "bad")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'model.n_layer'" in bad.stderr
    assert not (tmp_path / "bad").exists()  # nothing written for a bad config


def test_build_fails_on_a_project_import_inside_a_function(tmp_path):
    root = make_package(tmp_path, {"a": "def g(): pass\n", "b": "def f():\n    from kernel.a import g\n    return g\n"})
    with pytest.raises(BuildError, match="must be at top level"):
        stitch(root)


@pytest.mark.slow
def test_notebook_with_two_devices_launches_its_own_cells_under_torchrun(tmp_path):
    """'2 devices' faked on CPU: the notebook writes the program its cells make and runs it with torchrun (gloo)."""
    notebook = json.loads((ROOT / build_kernel.NOTEBOOK).read_text())
    out = tmp_path / "out"
    overrides = {**TINY_OVERRIDES, "train.devices": 2, "train.batch_size": 4}
    run_cell = next(i for i, c in enumerate(notebook["cells"]) if c.get("id") == "run")
    added = [nbformat.v4.new_code_cell("def print_data_report(data):\n    print('[user] my data report')"),
             nbformat.v4.new_code_cell("print('[user] an added cell that only prints')")]
    notebook["cells"][run_cell:run_cell] = [dict(c, id=f"added-{i}") for i, c in enumerate(added)]
    executed = build_kernel.execute_notebook(notebook, tmp_path, {"OVERRIDES": overrides, "OUT_DIR": str(out)},
                                             timeout=300)
    notebook["cells"][run_cell:run_cell + 2] = []
    printed = "".join("".join(o.get("text", "")) for c in code_cells(executed) for o in c["outputs"])
    assert printed.count("[user] my data report") == 1 and "[data] tokens:" not in printed  # the user's version ran
    assert re.search(r"\[dist\] your added cell\(s\) In \[\d+\] hold only definitions", printed)
    assert re.search(r"\[dist\] your added cell\(s\) In \[\d+\] ran here only", printed)
    assert f"[dist] 2 processes: torchrun --standalone --nproc_per_node=2 {out / 'train_gpt_program.py'}" in printed
    assert "[dist] 2 processes, each 2 x 1 accumulation of the global batch of 4 sequences" in printed
    assert printed.count("[done] val loss") == 1  # streamed from rank 0 only
    program = (out / "train_gpt_program.py").read_text()
    cells = [c["source"] if isinstance(c["source"], str) else "".join(c["source"]) for c in code_cells(notebook)]
    for section_code in cells[1:-2]:  # every section cell, as the notebook holds it; not parameters/run/sample
        assert section_code in program
    assert "import kernel" not in program and "from kernel" not in program
    ast.parse(program)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 30 and summary["tokens"] == 30 * 4 * 32
    last = "".join("".join(o.get("text", "")) for o in code_cells(executed)[-1]["outputs"])
    assert "=== sample 1 | prompt '\\n' ===" in last


def test_the_launcher_takes_each_section_cell_as_it_last_ran(monkeypatch):
    """IPython keeps every cell it ran in the line cache; an edited, re-run cell replaces its older form."""
    import linecache
    from kernel.distributed import notebook_sections_source

    def cell(name: str, number: int, body: str) -> None:
        lines = [f"# kernel section {number} of 2: s{number}\n", body]
        monkeypatch.setitem(linecache.cache, name, (len("".join(lines)), None, lines, name))

    cell("/tmp/ipykernel_1/a.py", 1, "def f():\n    return 'old'\n")
    cell("/tmp/ipykernel_1/b.py", 2, "def g():\n    return 2\n")
    cell("/tmp/ipykernel_1/c.py", 1, "def f():\n    return 'new'\n")
    namespace = {}
    exec(compile("def f():\n    return 'new'\n", "/tmp/ipykernel_1/c.py", "exec"), namespace)
    source = notebook_sections_source(namespace)
    assert "'new'" in source and "'old'" not in source and source.index("'new'") < source.index("return 2")
    namespace = {}
    exec(compile("def f():\n    return 'old'\n", "/tmp/ipykernel_1/a.py", "exec"), namespace)
    assert "'old'" in notebook_sections_source(namespace)  # the version whose functions are in use wins
    monkeypatch.delitem(linecache.cache, "/tmp/ipykernel_1/b.py")
    with pytest.raises(KernelError, match=r"missing sections \[2\]"):
        notebook_sections_source(namespace)


def test_added_definition_cells_are_carried_in_notebook_order_and_the_others_named(monkeypatch, capsys):
    """IPython's input history (`_ih`) says which cells ran in which order; the launch cell is the last one."""
    import linecache
    from kernel.distributed import notebook_sections_source

    sections = [f"# kernel section {n} of 2: s{n}\ndef s{n}():\n    return {n}\n" for n in (1, 2)]
    for n, code in enumerate(sections, start=1):
        monkeypatch.setitem(linecache.cache, f"/tmp/ipykernel_1/s{n}.py", (len(code), None, code.splitlines(True), ""))
    history = ["", "CONFIG = 'auto'\nOVERRIDES = {}\n",  # the parameters cell: carried, not named
               sections[0],
               "import math\ndef s1():\n    return math.pi\n",  # In [3]: a redefinition after section 1
               "get_ipython().system('nvidia-smi')\n",  # In [4]: a shell command
               sections[1],
               "GPT_forward = s1\n",  # In [6]: binds a name to a function
               "summary = main(CONFIG, OVERRIDES)\n",  # In [7]: an earlier run: never carried
               "print(s1())\n",  # In [8]
               "summary = main(CONFIG, OVERRIDES)\n"]  # the launching cell
    namespace = {"_ih": history}
    program = notebook_sections_source(namespace)
    order = [program.index(part) for part in ("CONFIG = 'auto'", "def s1():\n    return 1", "math.pi",
                                              "def s2()", "GPT_forward = s1")]
    assert order == sorted(order) and "nvidia-smi" not in program and "main(" not in program
    assert "print(s1())" not in program
    exec(compile(program, "program", "exec"), scope := {})
    assert scope["s1"]() == scope["GPT_forward"]() == math.pi
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[dist] your added cell(s) In [3], In [6] hold only definitions: the training "
                                 "processes run them too")
    assert printed[1].startswith("[dist] your added cell(s) In [4], In [8] ran here only")
    assert len(printed) == 2


# build_notebook reads the code cells' marker from the package's distributed module.
DISTRIBUTED = '"""## 1. Launch"""\nSECTION_MARKER = "# kernel section {number} of {total}: {name}"\n'


@pytest.mark.parametrize("doc, message", [
    ("## 3. A", r"kernel/a.py: its docstring starts with '## 3. A'; it is section 2 of NOTEBOOK_SECTIONS, so it "
                r"must start with the heading '## 2. Title'"),
    ("# 2. A", r"kernel/a.py: .*must start with the heading '## 2. Title'"),
    ("A module without a heading.", r"kernel/a.py: .*'## 2. Title'"),
    ("## 2. A\n\n# Details\n\nText.", r"kernel/a.py: its docstring has the H1 heading '# Details'"),
])
def test_build_fails_on_a_section_heading_that_is_not_its_number(tmp_path, doc, message):
    root = make_package(tmp_path, {"distributed": DISTRIBUTED, "a": f'"""{doc}"""\nX = 1\n'})
    with pytest.raises(BuildError, match=message):
        build_notebook(root)


def test_headings_may_hold_h1_lines_inside_code_fences(tmp_path):
    doc = "## 2. A\n\n```python\n# a comment, not a heading\n```\n\n### Details"
    root = make_package(tmp_path, {"distributed": DISTRIBUTED, "a": f'"""{doc}"""\nX = 1\n'})
    assert "".join(build_notebook(root)["cells"][6]["source"]) == doc


def method_of(lines: int) -> str:
    """A module whose one method spans `lines` lines from its `def` (line 4) on, below a decorator."""
    body = "".join(f"        x{i} = {i}\n" for i in range(lines - 2))
    return f'"""## 2. A"""\nclass Box:\n    @staticmethod\n    def f():\n{body}        return 0\n'


def test_build_fails_on_a_function_longer_than_the_limit(tmp_path):
    assert build_kernel.MAX_FUNCTION_LINES == 60
    root = make_package(tmp_path, {"distributed": DISTRIBUTED, "a": method_of(61)})
    with pytest.raises(BuildError, match=r"kernel/a.py:4: Box.f is 61 lines"):
        build_notebook(root)
    (root / "kernel" / "a.py").write_text(method_of(60))
    build_notebook(root)
    nested = textwrap.indent(method_of(81).split("\n", 1)[1], "    ")  # the class, inside a function
    (root / "kernel" / "a.py").write_text(f'"""## 2. A"""\ndef outer():\n{nested}')
    with pytest.raises(BuildError, match=r"kernel/a.py:2: outer is 84 lines; kernel/a.py:5: outer.<locals>.Box.f is 81 lines; split"):
        build_notebook(root)


def test_each_section_heading_is_its_code_cells_section_number():
    cells = build_notebook()["cells"]
    numbers = []
    for markdown, code in zip(cells, cells[1:]):
        match = SECTION_MARKER_PATTERN.match(code["source"][0].rstrip("\n")) if code["cell_type"] == "code" else None
        if match and match[3] in NOTEBOOK_SECTIONS:  # a section's first cell: under the section's own heading
            number = NOTEBOOK_SECTIONS.index(match[3]) + 1
            assert markdown["cell_type"] == "markdown" and markdown["source"][0].startswith(f"## {number}. "), \
                (match[3], markdown["source"][0])
            numbers.append(number)
        elif match:  # a later part of a section: under its own sub-heading
            assert markdown["source"][0].startswith("### "), (match[3], markdown["source"][0])
    assert numbers == list(range(1, len(NOTEBOOK_SECTIONS) + 1))
    h1 = [c["id"] for c in cells if c["cell_type"] == "markdown" and any(re.match(r" {0,3}# ", line) for line in c["source"])]
    assert h1 == ["title"]
