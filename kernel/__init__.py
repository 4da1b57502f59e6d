"""Train a small GPT from scratch on your own text: the package behind the Kaggle notebook.

Each module is one section of the notebook that build_kernel.py stitches from them, in this order.
"""

NOTEBOOK_SECTIONS = ["env", "bundled_configs", "tokenization", "config", "data", "model", "distributed", "checkpoint",
                     "train", "plan", "sample", "export", "report", "main"]
