"""The YAML presets in `configs/`, by file name.

In the package they are read from the repository's `configs/` folder. The notebook has no such folder
(Kaggle gets one .ipynb file), so build_kernel.py replaces this module with a cell that holds the same
mapping as literal text.
"""

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

BUNDLED_CONFIGS: dict[str, str] = {
    path.name: path.read_text(encoding="utf-8") for path in sorted(CONFIGS_DIR.glob("*.yaml"))
}
