"""## 12. LoRA: low-rank adapters on a pretrained model

With `train.lora_rank` > 0 a model started from `model.init_from` (Llama or Qwen3) trains only small
adapters: each chosen projection W (attention's q, k, v, o and, with `attn_mlp`, the MLP's gate, up and
down) computes W x + (alpha / r) B A dropout(x), with A (r x in) and B (out x r) the only weights that learn.
B starts at zero, so training starts exactly at the pretrained model. The pretrained weights stay frozen:
no gradients, no optimizer state, and on a GPU they are held in the training precision (fp16 on a T4, bf16
on Ampere and later); the adapters stay in fp32. Attention's q, k and v are one fused matrix here
(`c_attn`), so each gets its own adapter on its rows, as PEFT has one per q_proj, k_proj and v_proj.

Checkpoints hold the adapters and a fingerprint of the pretrained weights (a SHA-256 of their bytes): a
resumed run loads the pretrained model again from `model.init_from` and refuses one whose weights differ.
At export the adapters are merged into the weights (W + (alpha / r) B A): `hf/` is a plain transformers
model, and `hf-adapter/` holds the adapters in PEFT's format, loadable with
`peft.PeftModel.from_pretrained(base, "outputs/hf-adapter")`.
"""

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel.env import KernelError
from kernel.config import Config, TrainConfig, lora_projections
from kernel.model import GPT, build_model
from kernel.hf_interop import find_model_folder, load_hf_weights

LORA_MARK = "lora_"  # in the names of the adapters' tensors (and nothing else's)
# Our modules for transformers' projections of a Llama/Qwen3 layer; q, k and v are row slices of c_attn.
PROJECTIONS = {"q": ("attn.c_attn", "self_attn.q_proj"), "k": ("attn.c_attn", "self_attn.k_proj"),
               "v": ("attn.c_attn", "self_attn.v_proj"), "o": ("attn.c_proj", "self_attn.o_proj"),
               "gate": ("mlp.w_gate", "mlp.gate_proj"), "up": ("mlp.w_up", "mlp.up_proj"),
               "down": ("mlp.c_proj", "mlp.down_proj")}


class LoRALinear(nn.Linear):
    """A frozen linear layer plus one low-rank adapter per row slice of its output (a whole projection is one
    slice). Its own weight and bias keep their names, so the base model's state dict, loading and export stay
    as they were; the adapters are `lora_A.<name>` (r x in) and `lora_B.<name>` (rows x r), in fp32."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.slices, self.rank, self.scaling = slices, rank, alpha / rank
        device = base.weight.device
        self.lora_A = nn.ParameterDict({name: nn.Parameter(torch.empty(rank, self.in_features, device=device))
                                        for name in slices})
        self.lora_B = nn.ParameterDict({name: nn.Parameter(torch.zeros(stop - start, rank, device=device))
                                        for name, (start, stop) in slices.items()})
        for a in self.lora_A.values():  # PEFT's initialisation: A as nn.Linear's weight, B zero
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        dropped = self.lora_dropout(x)
        pieces, at = [], 0
        for name, (start, stop) in sorted(self.slices.items(), key=lambda item: item[1]):
            if start > at:  # rows without an adapter
                pieces.append(out.new_zeros(*out.shape[:-1], start - at))
            a, b = self.lora_A[name], self.lora_B[name]
            pieces.append(F.linear(F.linear(dropped.to(a.dtype), a), b).to(out.dtype) * self.scaling)
            at = stop
        if at < self.out_features:
            pieces.append(out.new_zeros(*out.shape[:-1], self.out_features - at))
        return out + torch.cat(pieces, dim=-1)

    def delta(self) -> torch.Tensor:
        """The change the adapters make to the weight: (alpha / r) B A on each slice's rows, in fp32."""
        full = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        for name, (start, stop) in self.slices.items():
            full[start:stop] = self.scaling * (self.lora_B[name] @ self.lora_A[name])
        return full


# --- Adding the adapters, freezing the base ---------------------------------------------------------------

def adapted_slices(model: GPT, projections: tuple[str, ...]) -> dict[str, dict[str, tuple[int, int]]]:
    """For each of a block's modules that gets adapters: {projection: its rows}."""
    sizes = model.transformer.h[0].attn.sizes  # q, k, v rows of c_attn
    bounds = {"q": (0, sizes[0]), "k": (sizes[0], sizes[0] + sizes[1]), "v": (sizes[0] + sizes[1], sum(sizes))}
    block = model.transformer.h[0]
    slices: dict[str, dict[str, tuple[int, int]]] = {}
    for projection in projections:
        module = PROJECTIONS[projection][0]
        rows = bounds.get(projection) or (0, block.get_submodule(module).out_features)
        slices.setdefault(module, {})[projection] = rows
    return slices


def add_adapters(model: GPT, train: TrainConfig) -> None:
    """Freeze every weight, then put adapters on the chosen projections of every block (only they train)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module, slices in adapted_slices(model, lora_projections(train.lora_targets)).items():
        parent_name, _, child = module.rpartition(".")
        for block in model.transformer.h:
            parent = block.get_submodule(parent_name)
            base = getattr(parent, child)
            setattr(parent, child, LoRALinear(base, slices, train.lora_rank, train.lora_alpha, train.lora_dropout))


def hold_base_in(model: GPT, dtype: torch.dtype, device: torch.device) -> None:
    """The frozen weights in the training precision on a GPU (half the memory, no fp32 master copy needed:
    they never change); on a CPU they stay fp32. The adapters stay fp32 for their optimizer."""
    if device.type != "cuda" or dtype == torch.float32:
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            if LORA_MARK not in name and param.is_floating_point():
                param.data = param.data.to(dtype)


def base_fingerprint(model: GPT) -> str:
    """SHA-256 over the frozen weights' names, shapes and bytes (as loaded, before any change of precision)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if LORA_MARK in name:
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def lora_settings(train: TrainConfig) -> dict:
    return {"rank": train.lora_rank, "alpha": train.lora_alpha, "dropout": train.lora_dropout,
            "targets": list(lora_projections(train.lora_targets))}


def build_lora_model(config: Config, vocab_size: int) -> tuple[GPT, dict]:
    """The pretrained model of model.init_from with fresh adapters (B = 0), and what a checkpoint records of it:
    the adapters' settings and the pretrained weights' fingerprint."""
    model = build_model(config, vocab_size)
    folder = find_model_folder(config.model.init_from)
    count = load_hf_weights(model, folder, vocab_size)
    print(f"[lora] {folder}: {count} tensors loaded and frozen; adapters of rank {config.train.lora_rank} on "
          f"{', '.join(lora_projections(config.train.lora_targets))}")
    info = {**lora_settings(config.train), "base_fingerprint": base_fingerprint(model)}
    add_adapters(model, config.train)
    return model, info


# --- Checkpoints: the adapters and the base they belong to ------------------------------------------------

def adapter_state(model: GPT) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if LORA_MARK in name}


def load_adapters(model: GPT, saved: dict, where: str) -> None:
    """The adapters a checkpoint holds into a model that has them (the base is already loaded)."""
    expected = adapter_state(model)
    if set(saved) != set(expected):
        raise KernelError(f"{where}: its adapters ({len(saved)} tensors) do not fit the model's ({len(expected)}): "
                          "train.lora_targets or the model changed")
    model.load_state_dict(saved, strict=False)


def check_same_base(saved: dict, current: dict, where: str) -> None:
    """A resumed (or loaded) LoRA run must adapt the same pretrained weights with the same adapter shape."""
    if not saved and not current:
        return
    if bool(saved) != bool(current):
        raise KernelError(f"cannot resume from {where}: it was trained {'with' if saved else 'without'} LoRA and "
                          f"train.lora_rank is now {current.get('rank', 0)}; set it back to {saved.get('rank', 0)}, "
                          "or set train.resume=never (or another --out) to start a new run")
    changed = [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in ("rank", "alpha", "targets")
               if saved.get(key) != current.get(key)]
    if changed:
        raise KernelError(f"cannot resume from {where}: the LoRA adapters changed ({', '.join(changed)}); set them "
                          "back, or set train.resume=never (or another --out) to start a new run")
    if saved["base_fingerprint"] != current["base_fingerprint"]:
        raise KernelError(
            f"cannot resume from {where}: its LoRA adapters were trained on other pretrained weights than those "
            f"model.init_from names now (fingerprint {saved['base_fingerprint'][:12]} vs "
            f"{current['base_fingerprint'][:12]}): attach the model the run started from, or set train.resume=never "
            "(or another --out) to start a new run")


def load_lora_run(config: Config, vocab_size: int, saved_info: dict, adapters: dict, where: str) -> GPT:
    """A LoRA checkpoint's model: the pretrained base again from model.init_from, checked, plus its adapters."""
    model, info = build_lora_model(config, vocab_size)
    check_same_base(saved_info, info, where)
    load_adapters(model, adapters, where)
    return model


# --- Export: merged weights, PEFT's adapter folder ---------------------------------------------------------

def lora_modules(model: GPT) -> list[tuple[str, LoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def merged_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights with the adapters merged in (W + (alpha / r) B A, in fp32), under the base names."""
    state = {name: tensor for name, tensor in model.state_dict().items() if LORA_MARK not in name}
    with torch.no_grad():
        for name, module in lora_modules(model):
            state[f"{name}.weight"] = module.weight.float() + module.delta()
    return state


def peft_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names for the transformers model (base_model.model.model.layers.{i}.self_attn.
    q_proj.lora_A.weight, ...): A is (r x in), B (out x r), as PEFT's lora_A/lora_B Linear weights."""
    theirs = {(ours, projection): hf for projection, (ours, hf) in PROJECTIONS.items()}
    tensors = {}
    for index, block in enumerate(model.transformer.h):
        for module_name, module in lora_modules(block):
            for projection in module.slices:
                prefix = f"base_model.model.model.layers.{index}.{theirs[(module_name, projection)]}"
                tensors[f"{prefix}.lora_A.weight"] = module.lora_A[projection].detach().float().cpu().contiguous()
                tensors[f"{prefix}.lora_B.weight"] = module.lora_B[projection].detach().float().cpu().contiguous()
    return tensors


def peft_config(config: Config) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA on a causal language model."""
    t = config.train
    targets = [PROJECTIONS[p][1].rpartition(".")[2] for p in lora_projections(t.lora_targets)]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config.model.init_from,
            "r": t.lora_rank, "lora_alpha": t.lora_alpha, "lora_dropout": t.lora_dropout, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None}


def write_peft_adapter(model: GPT, config: Config, folder: Path) -> Path:
    """`adapter_config.json` + `adapter_model.safetensors` (no peft import needed to write them)."""
    from safetensors.torch import save_file  # imported late, as in the export

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(peft_config(config), indent=2) + "\n", encoding="utf-8")
    save_file(peft_state_dict(model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def count_parameters(model: GPT) -> tuple[int, int]:
    """(trainable, total) parameters, a tied embedding counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
