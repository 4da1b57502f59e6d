"""Train a small GPT from scratch on your own text: the package behind the Kaggle notebook.

Each module is one section of the notebook that build_kernel.py stitches from them, in this order.
"""

NOTEBOOK_SECTIONS = ["env", "bundled_configs", "tokenization", "values", "config", "sources", "inputs", "chat",
                     "data", "model", "hf_interop", "lora", "distributed", "checkpoint", "optim", "memory",
                     "progress", "compiling", "train", "plan", "sample", "export", "report", "main"]
COMMAND_LINE_ONLY = ["cli"]  # modules the notebook leaves out: a notebook has its parameters cell instead
