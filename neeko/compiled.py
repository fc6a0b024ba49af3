"""A compiled, static-shape decode step for Llama-family models and the block bank.

The eager path runs the Hugging Face model with a growing `DynamicCache` and the bank's
routing installed around the call: Python per layer, ~5,000 small ops per step. Here one
decode step is a pure function of tensors, compiled once per shape bucket:

- the KV cache is one preallocated tensor per keys and values, (layers, slots, kv_heads,
  positions, head_dim); a row owns a slot, its token at position p sits in column p, and a
  step reads the first `bucket(rows)` slots and `bucket(length)` columns;
- the step returns the new token's keys and values instead of writing them, so the compiled
  graph mutates nothing (what CUDA graphs want); the caller writes them with one indexed copy;
- the gates are tensors: each row's blocks, gathered once per batch composition as
  (rows, d_in, k*p) and (rows, k*p, d_out) with their weights, exactly as the bank's
  `gathered` path lays them out; padding rows and padding blocks carry weight 0;
- q/k/v and gate/up are fused into one matrix each (the model's modules then hold views of
  it, so no memory is doubled); the blocks still add to q and v (or whatever the bank
  wraps) exactly;
- RoPE tables come from the model's own rotary module, so scaled variants (Llama 3, YaRN,
  linear) match the eager path value for value.

Prefill stays eager (one batched call per admission); only the decode step is compiled.
On the CPU, steps with fp32 or int8 weights run `neeko.native`'s C step instead where it
is faster (`StaticDecoder.native_rows`), which computes the same thing reading each weight
once per step: one row as a streamed product-sum (int8 widened to fp32 in registers, with
fp32 activations where torch's int8 kernel rounds them to bf16), several rows with the
rows in a vector's lanes (2.8x the graph at 16 rows over 8 characters).
`torch.compile` uses inductor on CPU and CUDA graphs (`reduce-overhead`) on CUDA; the eager
path stays the reference and the fallback (`Engine(decode="eager")`). Shapes are static
(`dynamic=False`): each (rows, columns) bucket compiles its own graph on first use (inductor
caches it on disk), since the graph dynamo would otherwise generalise over lengths after the
second bucket decodes ~30% slower on CPU.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from neeko import native as native_lib
from neeko.errors import GenerationError
from neeko.lora import BlockLoRALinear, Routing
from neeko.model import LoadedModel
from neeko.native import PROJECTIONS, NativeStep

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
"""`config.model_type`s whose decoder layer this step reproduces."""
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE variants whose tables do not depend on the sequence length."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Row counts a step is compiled for (a batch runs in the smallest bucket that holds it)."""
LENGTH_BUCKET = 256
"""KV columns a step reads are rounded up to a multiple of this."""
WeightDtype = str
"""`fp32` (the model's own), `bf16`, `int8` (per output row) or `int4` (groups of 32);
weight-only: activations, norms, attention and the blocks stay in the model's dtype."""
WEIGHT_DTYPES = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32


class UnsupportedModel(GenerationError):
    """The compiled step cannot reproduce this model; use the eager path."""


def bucket(n: int, sizes: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest size in `sizes` that holds `n` (beyond the last: the next power of two)."""
    for size in sizes:
        if n <= size:
            return size
    return 1 << (n - 1).bit_length()


def length_bucket(n: int, limit: int) -> int:
    """`n` KV columns rounded up to `LENGTH_BUCKET`, at most `limit`."""
    return min(limit, -(-max(n, 1) // LENGTH_BUCKET) * LENGTH_BUCKET)


@dataclass(frozen=True)
class LoRAInputs:
    """The batch's gates as tensors: per wrapped projection name, its rows' gathered blocks."""

    a: tuple[Tensor, ...]
    """(layers, rows, k*p, d_in) per name in `StaticDecoder.targets`."""
    b: tuple[Tensor, ...]
    """(layers, rows, k*p, d_out) per name."""
    w: Tensor
    """(rows, k*p): each row's block weights times alpha / rank, repeated p times."""


class _Linear(nn.Module):
    """A frozen weight in the chosen storage.

    `fp32` keeps the model's weight; `bf16` converts it; `int8` stores int8 with one scale
    per output row (torch's `_weight_int8pack_mm`); `int4` stores 4-bit codes with a scale
    and zero per group of 32 inputs (torch's `_weight_int4pack_mm_for_cpu`; CPU only). The
    packaged SmolLM2 is itself a Q4_1 checkpoint (groups of 32, scale and minimum), so
    `int4` holds its weights up to the bf16 rounding of the scales. With `gemv`, one row
    times an fp32 or bf16 weight is written as a row-wise product-sum in fp32, which
    inductor turns into one vectorised kernel that streams the weight once (about twice as
    fast as the BLAS call for a single row on the 2-core CPU we measure on; for bf16 it
    reads half the bytes, and CPUs without native bf16 matmuls gain the most). The same
    for int8 ran 4x slower than fp32 there, so int8 keeps torch's kernel in the graph; one
    row with int8 weights takes the native step (3.3x the fp32 native step in one run on
    the 2-core AVX-512 CPU; the ratio moves with the machine's memory speed).
    """

    def __init__(
        self, weight: Tensor, bias: Tensor | None, storage: WeightDtype, gemv: bool = False
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if storage == "int4" and in_features % INT4_GROUP:
            storage = "int8"  # the int4 kernel needs whole groups
        self.storage = storage
        self.gemv = gemv and storage in ("fp32", "bf16") and weight.device.type == "cpu"
        self.out_dtype = weight.dtype
        w = weight.detach()
        if storage == "int4":
            groups = w.float().view(out_features, -1, INT4_GROUP)
            low, high = groups.amin(-1), groups.amax(-1)
            scale = ((high - low) / 15).clamp(min=1e-12)
            codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
            packed = torch._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32).view(out_features, in_features), 8
            )
            zeros = low + 8 * scale  # the kernel computes (code - 8) * scale + zero
            self.register_buffer("weight", packed)
            self.register_buffer(
                "scale", torch.stack([scale, zeros], -1).transpose(0, 1).contiguous().bfloat16()
            )
        elif storage == "int8":
            scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12)
            self.register_buffer("weight", (w.float() / scale[:, None]).round().to(torch.int8))
            self.register_buffer("scale", scale.to(torch.bfloat16))
        else:
            dtype = torch.bfloat16 if storage == "bf16" else w.dtype
            self.register_buffer("weight", w if dtype == w.dtype else w.to(dtype))
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gemv and x.shape[0] == 1:
            y = (x[:, None, :].float() * self.weight[None].float()).sum(-1)
        elif self.storage == "int4":
            y = torch._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), self.weight, INT4_GROUP, self.scale
            )
        elif self.storage == "int8":
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale)
        elif self.storage == "bf16":
            y = nn.functional.linear(x.to(torch.bfloat16), self.weight)
        else:
            y = nn.functional.linear(x, self.weight)
        y = y.to(self.out_dtype)
        return y if self.bias is None else y + self.bias


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, storage: WeightDtype, gemv: bool) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Linear(*_fuse(attn, ("q_proj", "k_proj", "v_proj")), storage, gemv)
        self.o = _Linear(*_weights(attn.o_proj), storage, gemv)
        self.gate_up = _Linear(*_fuse(mlp, ("gate_proj", "up_proj")), storage, gemv)
        self.down = _Linear(*_weights(mlp.down_proj), storage, gemv)
        self.register_buffer("ln_in", layer.input_layernorm.weight.detach())
        self.register_buffer("ln_post", layer.post_attention_layernorm.weight.detach())
        self.sizes = tuple(_base(getattr(attn, n)).out_features for n in PROJECTIONS[:3])
        self.inter = _base(mlp.up_proj).out_features


class StaticDecoder(nn.Module):
    """One model's decode step over a static KV cache, compiled per shape bucket."""

    _instances = 0

    def __init__(
        self,
        loaded: LoadedModel,
        weights: WeightDtype = "fp32",
        compile: bool = True,
        native: bool | None = None,
    ) -> None:
        """Take `loaded`'s weights (q/k/v and gate/up fused in place) and its bank's layout.

        The bank is the one wrapped into `loaded.model`, if any. With `native` (default:
        `compile`), batch-1 steps run `neeko.native`'s step where it supports the model.
        Raises UnsupportedModel for architectures it does not reproduce.
        """
        super().__init__()
        model, cfg = loaded.model, loaded.model.config
        if cfg.model_type not in SUPPORTED_TYPES:
            raise UnsupportedModel(f"no compiled decode step for model type {cfg.model_type!r}")
        rotary = model.model.rotary_emb
        if getattr(rotary, "rope_type", "default") not in STATIC_ROPE:
            raise UnsupportedModel(f"RoPE type {rotary.rope_type!r} depends on the length")
        if weights not in WEIGHT_DTYPES:
            raise GenerationError(f"weights must be one of {WEIGHT_DTYPES}, got {weights!r}")
        if weights in ("int8", "int4") and loaded.device.type != "cpu":
            raise GenerationError(f"{weights} weights run on CPU only (their kernels are CPU's)")
        self.weights = weights
        self.dtype = loaded.dtype
        self.device = loaded.device
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.act = ACT2FN[cfg.hidden_act]
        self.act_name = str(cfg.hidden_act)
        window = getattr(cfg, "sliding_window", None)
        use_window = getattr(cfg, "use_sliding_window", True)
        self.window = int(window) if window and use_window else 0
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 2048))
        self.layers = nn.ModuleList(_Layer(layer, weights, compile) for layer in model.model.layers)
        self.register_buffer("embed", model.model.embed_tokens.weight.detach())
        self.register_buffer("norm", model.model.norm.weight.detach())
        self.head = _Linear(*_weights(model.lm_head), weights, compile)
        self._rotary = [rotary]  # a list: not a submodule of the decoder (never compiled)
        self._rope_len = 0
        self.cos = self.sin = torch.empty(0)
        self.wrapped: dict[str, list[BlockLoRALinear]] = {}
        """Per projection name the bank wraps, its bank layer in every decoder layer."""
        for name in PROJECTIONS:
            parent = "self_attn" if name in PROJECTIONS[:4] else "mlp"
            found = [getattr(getattr(layer, parent), name) for layer in model.model.layers]
            wrapped = [m for m in found if isinstance(m, BlockLoRALinear)]
            if wrapped and len(wrapped) < len(found):
                raise UnsupportedModel(f"the bank wraps {name} in some layers only")
            if wrapped:
                self.wrapped[name] = wrapped
        self.targets = tuple(self.wrapped)
        StaticDecoder._instances += 1
        self.uid = StaticDecoder._instances
        self._step = self._forward
        if compile:
            cuda = self.device.type == "cuda"
            _allow_graphs(len(BATCH_BUCKETS) * -(-self.max_positions // LENGTH_BUCKET))
            self._step = torch.compile(
                _own_code(self._forward, self.uid),
                mode="reduce-overhead" if cuda else None,
                fullgraph=True,
                dynamic=False,
                options={"guard_filter_fn": _skip_weight_guards},
            )
        self.native: NativeStep | None = None
        if (compile if native is None else native) and native_lib.supports(self):
            lib = native_lib.library()
            self.native = NativeStep(self, lib) if lib is not None else None
        self.native_rows = native_lib.BATCH_ROWS.get(weights, (0, 0))
        """Steps of several rows run natively (where `native` is set) for row counts in this
        range, inclusive."""

    def runs_native(self, rows: int) -> bool:
        """Whether a step of `rows` rows runs the native step (else the compiled graph)."""
        low, high = self.native_rows
        return self.native is not None and (rows == 1 or low <= rows <= high)

    # -- inputs --------------------------------------------------------------------------

    def rope(self, length: int) -> tuple[Tensor, Tensor]:
        """The cos and sin tables for positions [0, length), from the model's rotary module."""
        if length > self._rope_len:
            n = max(length, min(self.max_positions, 2 * self._rope_len, 1 << 20), LENGTH_BUCKET)
            positions = torch.arange(n, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            with torch.inference_mode():
                cos, sin = self._rotary[0](probe, positions)
            self.cos, self.sin, self._rope_len = cos[0], sin[0], n
        return self.cos, self.sin

    def lora_inputs(self, routing: Routing | None, rows: int) -> LoRAInputs | None:
        """The gates of `routing` as step inputs, padded with weight-0 rows to `rows`."""
        if routing is None or routing.is_empty or not self.targets:
            return None
        if routing.path != "gathered":
            routing = Routing(routing.gates, routing.scale, routing.rank, "gathered")
        n = routing.row_blocks.shape[0]
        a_out, b_out = [], []
        for layers in self.wrapped.values():
            a_parts, b_parts = [], []
            for layer in layers:
                a_t, b_t = routing.weights(layer)  # (n*k, d_in, p), (n, k*p, d_out)
                a_parts.append(a_t.transpose(1, 2).reshape(n, -1, a_t.shape[1]))
                b_parts.append(b_t)
            a_out.append(_pad_rows(torch.stack(a_parts, dim=1), rows).transpose(0, 1).contiguous())
            b_out.append(_pad_rows(torch.stack(b_parts, dim=1), rows).transpose(0, 1).contiguous())
        w = _pad_rows(routing.row_weights[:, 0].contiguous(), rows)
        return LoRAInputs(tuple(a_out), tuple(b_out), w)

    # -- the step ------------------------------------------------------------------------

    def step(
        self,
        tokens: Tensor,
        positions: Tensor,
        keys: Tensor,
        values: Tensor,
        lora: LoRAInputs | None,
        write: bool = False,
        live: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits (rows, vocab) of `tokens` (rows,) at `positions` (rows,), and their KV.

        `keys`/`values`: (layers, rows, kv_heads, columns, head_dim), column j of a row valid
        iff j < its position. Returns the new keys and values as (layers, rows, kv_heads,
        head_dim); with `write` they are also stored at column `positions` of every row
        (the native step stores them itself, sparing the caller's indexed write). Rows from
        `live` on are padding: their outputs are to be ignored (the native step skips them,
        leaving them zero, and writes nothing for them).
        """
        # positions are at most the columns; tables cut to this length keep one shape per bucket
        length = int(keys.shape[3]) + 1
        cos, sin = (t[:length] for t in self.rope(length))
        rows = int(tokens.shape[0])
        if self.native is not None and self.runs_native(rows):
            args = (tokens, positions, keys, values, cos, sin, lora, write)
            return self.native(*args) if rows == 1 else self.native.batch(*args, live)
        a, b, w = (lora.a, lora.b, lora.w) if lora is not None else ((), (), None)
        logits, new_k, new_v = self._step(tokens, positions, keys, values, cos, sin, a, b, w)
        if write:
            rows = torch.arange(tokens.shape[0], device=tokens.device)
            keys[:, rows, :, positions] = new_k.transpose(0, 1)
            values[:, rows, :, positions] = new_v.transpose(0, 1)
        return logits, new_k, new_v

    def _forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        keys: Tensor,
        values: Tensor,
        cos_table: Tensor,
        sin_table: Tensor,
        lora_a: tuple[Tensor, ...],
        lora_b: tuple[Tensor, ...],
        lora_w: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.uid < 0:  # read, so the graph is guarded on this instance (see below)
            raise AssertionError
        rows, columns = tokens.shape[0], keys.shape[3]
        h = self.embed[tokens]  # (rows, hidden)
        cos = cos_table[positions][:, None, :]  # (rows, 1, head_dim)
        sin = sin_table[positions][:, None, :]
        col = torch.arange(columns, device=tokens.device)
        valid = col[None, :] < positions[:, None]  # (rows, columns)
        if self.window:
            valid = valid & (col[None, :] > positions[:, None] - self.window)
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=tokens.device)
        bias = bias.masked_fill(~valid, -math.inf)[:, None, None, :]  # (rows, 1, 1, columns)
        pairs = zip(lora_a, lora_b, strict=True)
        lora = dict(zip(self.targets, pairs, strict=True)) if lora_a else {}
        new_k, new_v = [], []
        group = self.n_heads // self.n_kv
        scale = self.head_dim**-0.5
        for i, layer in enumerate(self.layers):
            blocks = {name: (a[i], b[i]) for name, (a, b) in lora.items()}
            x = _rms(h, layer.ln_in, self.eps)
            q, k, v = layer.qkv(x).split(layer.sizes, dim=-1)
            q = _add_lora(q, x, blocks.get("q_proj"), lora_w)
            k = _add_lora(k, x, blocks.get("k_proj"), lora_w)
            v = _add_lora(v, x, blocks.get("v_proj"), lora_w)
            q = q.view(rows, self.n_heads, self.head_dim)
            k = k.view(rows, self.n_kv, self.head_dim)
            v = v.view(rows, self.n_kv, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            new_k.append(k)
            new_v.append(v)
            # attention of the one new query per row over its cached columns plus itself
            # (written as product-sums, which inductor fuses: no per-layer GEMM calls)
            qg = q.view(rows, self.n_kv, group, 1, self.head_dim).float()
            past = (qg * keys[i].float()[:, :, None]).sum(-1) * scale + bias  # (r, kv, g, col)
            own = (qg[:, :, :, 0] * k.float()[:, :, None, :]).sum(-1, keepdim=True) * scale
            probs = torch.softmax(torch.cat([past, own], dim=-1), dim=-1)
            out = (probs[..., :columns, None] * values[i].float()[:, :, None]).sum(-2)
            out = out + probs[..., columns:] * v.float()[:, :, None, :]
            attn = out.to(h.dtype).reshape(rows, self.n_heads * self.head_dim)
            h = h + _add_lora(layer.o(attn), attn, blocks.get("o_proj"), lora_w)
            x = _rms(h, layer.ln_post, self.eps)
            gate, up = layer.gate_up(x).split(layer.inter, dim=-1)
            gate = _add_lora(gate, x, blocks.get("gate_proj"), lora_w)
            up = _add_lora(up, x, blocks.get("up_proj"), lora_w)
            y = self.act(gate) * up
            h = h + _add_lora(layer.down(y), y, blocks.get("down_proj"), lora_w)
        logits = self.head(_rms(h, self.norm, self.eps))
        return logits, torch.stack(new_k), torch.stack(new_v)


def _own_code(method: Any, uid: int) -> Any:
    """`method` bound again to a copy of its function with a code object of its own.

    Dynamo keeps compiled graphs (and its recompile limit) per code object: each decoder
    gets its own, so many decoders in one process never crowd each other's graphs out.
    """
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{uid}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


def _allow_graphs(n: int) -> None:
    """Let dynamo keep `n` graphs per decoder (past its default of 8 it would run eagerly)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, n)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * n)


def _skip_weight_guards(entries: Sequence[Any]) -> list[bool]:
    """Keep every guard but those on the decoder's own weights and module structure.

    Checking ~200 weights and modules before every step costs about a millisecond on CPU,
    and none of them changes after construction. Value guards stay, among them the
    decoder's `uid`: another decoder (other weights or storage) never reuses the graph.
    """
    return [not (e.name.startswith("self.") and e.guard_type in _STRUCTURE) for e in entries]


_STRUCTURE = {
    "TENSOR_MATCH",
    "TYPE_MATCH",
    "ID_MATCH",
    "NOT_PRESENT_IN_GENERIC_DICT",
    "EMPTY_NN_MODULE_HOOKS_DICT",
    "DICT_KEYS_MATCH",
    "SEQUENCE_LENGTH",
}
"""Guards on the decoder's weights and module structure, fixed once it is built."""


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm, operation for operation."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _add_lora(
    y: Tensor, x: Tensor, blocks: tuple[Tensor, Tensor] | None, w: Tensor | None
) -> Tensor:
    """`y` plus each row's gated blocks applied to `x`, as the bank's gathered path computes it."""
    if blocks is None or w is None:
        return y
    a, b = blocks  # (rows, k*p, d_in), (rows, k*p, d_out)
    z = (x[:, None, :].to(a.dtype) * a).sum(-1) * w  # (rows, k*p)
    return y + (z[:, :, None] * b).sum(1).to(y.dtype)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _base(module: nn.Module) -> nn.Linear:
    return module.base if isinstance(module, BlockLoRALinear) else module


def _weights(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    lin = _base(module)
    return lin.weight.detach(), None if lin.bias is None else lin.bias.detach()


def _fuse(parent: nn.Module, names: Sequence[str]) -> tuple[Tensor, Tensor | None]:
    """One weight (and bias) for `names`; each module's weight becomes a view of it."""
    linears = [_base(getattr(parent, n)) for n in names]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.detach() if b is not None else lin.weight.new_zeros(lin.out_features)
                for b, lin in zip(biases, linears, strict=True)
            ]
        )
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None and lin.bias is not None:
            lin.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias
