"""PEFT interop: export blocks (or an exact gate mix) as LoRA adapters, import adapters.

A block k of rank p is the LoRA adapter (A_k, B_k) with `lora_alpha = alpha`. A gate mix
over k blocks is exactly the rank k*p "cat" adapter A = [A_1; ...; A_k],
B = [w_1 B_1, ..., w_k B_k] with `lora_alpha = alpha * k` (so alpha'/r' = alpha/p). Either
can be served by any multi-LoRA engine (PEFT, vLLM, LoRAX, TGI).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from neeko.errors import BlockFormatError, GateError
from neeko.lora import BLOCK_DTYPES, Gate, LoRABank

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def export_adapter(bank: LoRABank, gate: Gate, out_dir: str | Path, base_model: str = "") -> Path:
    """Write `gate` (one block, or a mix) as a PEFT LoRA adapter folder; returns the folder."""
    items = [(k, float(w)) for k, w in gate.items() if w != 0]
    if not items:
        raise GateError("cannot export an empty gate: it is the base model, not an adapter")
    bank.gate_matrix([gate])  # checks indices and weights
    blocks = [(bank.get_block(k), w) for k, w in items]
    tensors: dict[str, Tensor] = {}
    for name in bank.module_names:
        a = torch.cat([blk[name][0] for blk, _ in blocks])  # (k*p, d_in)
        b = torch.cat([w * blk[name][1] for blk, w in blocks], dim=1)  # (d_out, k*p)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.float().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.float().contiguous().cpu()
    cfg = bank.config
    config = LoraConfig(
        r=cfg.rank * len(items),
        lora_alpha=cfg.alpha * len(items),
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in bank.module_names}),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
    )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_adapter(bank: LoRABank, adapter_dir: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Read a PEFT LoRA adapter of rank <= p as block weights for `bank` (bank unchanged).

    Rank r < p is zero-padded to p; PEFT's scale (alpha/r, or alpha/sqrt(r) with rsLoRA) is
    folded into B so the block reproduces the adapter exactly. Modules the adapter does not
    touch get zero blocks; modules the bank does not wrap are refused.
    """
    folder = Path(adapter_dir)
    config = _read_config(folder)
    r, p = int(config["r"]), bank.config.rank
    if not 1 <= r <= p:
        raise BlockFormatError(f"{folder}: adapter rank {r} exceeds the bank's block rank {p}")
    alpha = float(config.get("lora_alpha", r))
    peft_scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    factor = peft_scale / bank.config.scale
    tensors = _read_tensors(folder)
    weights = {}
    for name, layer in bank.layers.items():
        a_key, b_key = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        a = torch.zeros(p, layer.in_features)
        b = torch.zeros(layer.out_features, p)
        if a_key in tensors:
            if b_key not in tensors:
                raise BlockFormatError(f"{folder}: {name} has lora_A but no lora_B")
            ta, tb = tensors.pop(a_key), tensors.pop(b_key)
            for key, t in ((a_key, ta), (b_key, tb)):
                if t.dtype not in BLOCK_DTYPES:
                    raise BlockFormatError(
                        f"{folder}: {key} is {t.dtype}; adapter weights must be float32, "
                        "float16 or bfloat16"
                    )
            ta, tb = ta.float(), tb.float()
            if ta.shape != (r, layer.in_features) or tb.shape != (layer.out_features, r):
                raise BlockFormatError(
                    f"{folder}: {name} expects A {(r, layer.in_features)} and B "
                    f"{(layer.out_features, r)}, got {tuple(ta.shape)} and {tuple(tb.shape)}"
                )
            a[:r], b[:, :r] = ta, tb * factor
        weights[name] = (a, b)
    if tensors:
        extra = sorted(tensors)[:3]
        raise BlockFormatError(
            f"{folder}: adapter has weights for modules this bank does not wrap ({extra}...); "
            f"bank targets {list(bank.config.targets)}"
        )
    bank.check_weights(weights)
    return weights


def import_adapter(bank: LoRABank, adapter_dir: str | Path) -> int:
    """Add a PEFT LoRA adapter to the bank as a new block; returns its index."""
    return bank.add_block(read_adapter(bank, adapter_dir))


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise BlockFormatError(f"{folder}: no {CONFIG_FILE}; not a PEFT adapter folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BlockFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise BlockFormatError(f"{path}: not a LoRA adapter (peft_type must be LORA)")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise BlockFormatError(f"{path}: unsupported LoRA options {unsupported}")
    if not isinstance(config.get("r"), int):
        raise BlockFormatError(f"{path}: 'r' must be an integer")
    return config


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.exists():
        other = (
            " (pickled adapter_model.bin files are refused)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise BlockFormatError(f"{folder}: no {WEIGHTS_FILE}{other}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise BlockFormatError(f"{path} is not a valid safetensors file ({exc})") from None
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise BlockFormatError(f"{path}: {key} holds NaN or inf")
    # Adapters saved with an adapter name in the key ("lora_A.default.weight") are normalised.
    return {
        k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
        for k, v in tensors.items()
    }
