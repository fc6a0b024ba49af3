"""The block bank: per-character LoRA blocks on every targeted frozen linear layer.

For a targeted linear `W0` (d_out x d_in) the bank keeps N blocks of rank p,
`A` (N, p, d_in) and `B` (N, d_out, p). Batch row i with gate g_i (length N) computes

    h_i = W0 x_i + (alpha / p) * sum_k g_ik * B_k A_k x_i

Gates reach the layers through a `Routing` built once per batch and installed with
`LoRABank.route(...)` for the duration of a forward (or a whole decode loop); the layers read
it from the bank's `RoutingSlot`, never from module-global state. Three exact ways compute
the sum: `dense` (one rank n*p matmul pair over the union of blocks active in the batch),
`gathered` (each row gathers its own nonzero blocks, vLLM's bgmv shape) and `reference`
(plain loops, the ground truth the other two are tested against).
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from neeko.errors import BlockFormatError, GateError

LoRAPath = Literal["dense", "gathered", "reference"]
Gate = Mapping[int, float]
"""Block index -> weight. An empty gate runs the base model."""

BLOCK_FORMAT = "neeko-block"
BLOCK_VERSION = "1"
ALL_LINEAR = "all-linear"
BLOCK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The tensor dtypes a block may hold; anything else is refused, never converted."""
DEFAULT_RANK = 4
DEFAULT_ALPHA = 32.0
MAX_RANK = 256
"""The largest block rank a store may declare."""


@dataclass(frozen=True)
class BankConfig:
    """Hyper-parameters of the block bank (defaults follow the Neeko paper)."""

    rank: int = DEFAULT_RANK
    """p, the rank of every block."""
    alpha: float = DEFAULT_ALPHA
    """LoRA alpha; a block's update is scaled by alpha / rank."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the linear layers to wrap, matched on the last name part; ("all-linear",)
    wraps every linear inside the decoder layers."""
    path: LoRAPath = "gathered"
    """How the gated sum is computed (all exact up to float rounding): `gathered` (per-row
    GEMMs, so a row's result does not depend on which blocks other rows use), `dense` (one
    matmul pair over the union of the batch's blocks) or `reference` (plain loops)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha}")
        if not self.targets:
            raise ValueError("targets must name at least one linear layer")
        if self.path not in ("dense", "gathered", "reference"):
            raise ValueError(f"path must be dense, gathered or reference, got {self.path!r}")

    @property
    def scale(self) -> float:
        """Alpha / rank."""
        return self.alpha / self.rank

    @classmethod
    def for_rank(cls, rank: int) -> BankConfig:
        """Blocks of `rank` at the default scale (alpha grows with the rank)."""
        return cls(rank=rank, alpha=DEFAULT_ALPHA * rank / DEFAULT_RANK)


class Routing:
    """Per-row gates of one batch, prepared once and read by every bank layer.

    Gathered block weights are cached per layer, so a decode loop that keeps one Routing
    pays the gather once. Build a new Routing after the bank's weights change.
    """

    def __init__(self, gates: Tensor, scale: float, rank: int, path: LoRAPath) -> None:
        """Prepare `gates` (batch, N) for `path`; `scale` (alpha / rank) is folded in."""
        self.gates = gates
        self.scale = scale
        self.rank = rank
        self.path = path
        self.batch_size = gates.shape[0]
        self.active = (gates != 0).any(dim=0).nonzero().flatten()  # (n_act,) union of blocks
        self.is_empty = self.active.numel() == 0
        self._weights: dict[int, tuple[Tensor, Tensor]] = {}
        if self.is_empty:
            return
        if path == "gathered":
            k = int((gates != 0).sum(dim=1).max())
            _, top = gates.abs().topk(k, dim=1)  # (batch, k) block ids, ties in no set order
            # A row's blocks in index order, padding (weight 0) last: the sum is computed in
            # the same order however many blocks the bank holds, so adding a block (an
            # expansion) leaves every old gate's output bit for bit the same.
            n = gates.shape[1]
            order = torch.where(gates.gather(1, top) != 0, top, top + n).sort(dim=1).indices
            self.row_blocks = top.gather(1, order)
            weights = gates.gather(1, self.row_blocks) * scale  # (batch, k); padding gets 0
            self.row_weights = weights.repeat_interleave(rank, dim=1)[:, None, :]  # (b, 1, k*p)
        elif path == "dense":
            row_gates = gates.index_select(1, self.active) * scale  # (batch, n_act)
            rep = row_gates.repeat_interleave(rank, dim=1)  # (batch, n_act*p)
            # When every row has the same gate it is folded into B once, at gather time.
            self.uniform = bool((gates == gates[:1]).all())
            self.dense_gates = None if self.uniform else rep[:, None, :]  # (batch, 1, n_act*p)
            self._fold = rep[0] if self.uniform else None

    def select_rows(self, rows: Tensor) -> Routing:
        """The same routing for a subset of rows, sharing the gathered weights if possible."""
        sub = Routing(self.gates.index_select(0, rows), self.scale, self.rank, self.path)
        if (
            self.path == "dense"
            and not sub.is_empty
            and sub.uniform == self.uniform
            and torch.equal(sub.active, self.active)
        ):
            sub._weights = self._weights
        return sub

    def weights(self, layer: BlockLoRALinear) -> tuple[Tensor, Tensor]:
        """The layer's blocks laid out for this routing's path (cached, or live when training)."""
        if layer.trainable:
            return self._gather(layer)
        key = id(layer)
        if key not in self._weights:
            self._weights[key] = self._gather(layer)
        return self._weights[key]

    def _gather(self, layer: BlockLoRALinear) -> tuple[Tensor, Tensor]:
        if self.path == "gathered":
            n, k = self.row_blocks.shape
            a, b = layer.blocks(self.row_blocks.flatten())  # (n*k, p, d_in), (n*k, d_out, p)
            a_t = a.transpose(1, 2)  # (n*k, d_in, p)
            b_t = b.view(n, k, *b.shape[1:]).transpose(2, 3).reshape(n, k * self.rank, -1)
            return a_t, b_t  # b_t: (n, k*p, d_out)
        a, b = layer.blocks(self.active)  # (n_act, p, d_in), (n_act, d_out, p)
        a_flat = a.reshape(-1, a.shape[-1])  # (n_act*p, d_in)
        b_flat = b.permute(1, 0, 2).reshape(b.shape[1], -1)  # (d_out, n_act*p)
        if self._fold is not None:
            b_flat = b_flat * self._fold
        return a_flat, b_flat


class RoutingSlot:
    """Holds the routing of the forward in progress; one per bank, shared by its layers."""

    def __init__(self) -> None:
        self.routing: Routing | None = None


class BlockLoRALinear(nn.Module):
    """A frozen linear layer plus a bank of gated rank-p blocks."""

    def __init__(self, base: nn.Linear, rank: int, slot: RoutingSlot) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.slot = slot
        self.rank = rank
        self.in_features, self.out_features = base.in_features, base.out_features
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("A", torch.zeros(0, rank, self.in_features, **kw), persistent=False)
        self.register_buffer("B", torch.zeros(0, self.out_features, rank, **kw), persistent=False)
        self.n_blocks = 0
        self.trainable = nn.ParameterDict()  # str(block) -> A, "B{block}" -> B while training

    def forward(self, x: Tensor) -> Tensor:
        """W0 x plus each row's gated block sum (x: (batch, seq, d_in))."""
        y = self.base(x)
        routing = self.slot.routing
        if routing is None or routing.is_empty:
            return y
        if x.dim() != 3 or x.shape[0] != routing.batch_size:
            raise GateError(
                f"routing is for {routing.batch_size} rows but the layer got input {tuple(x.shape)}"
            )
        if x.dtype != self.A.dtype:
            x = x.to(self.A.dtype)
        if routing.path == "dense":
            return self._dense(x, y, routing)
        if routing.path == "gathered":
            return self._gathered(x, y, routing)
        return y + self.reference_delta(x, routing.gates * routing.scale).to(y.dtype)

    def _dense(self, x: Tensor, y: Tensor, routing: Routing) -> Tensor:
        """One rank n_act*p matmul pair over the union of blocks the batch uses."""
        a_flat, b_flat = routing.weights(self)  # (n_act*p, d_in), (d_out, n_act*p)
        z = nn.functional.linear(x, a_flat)  # (batch, seq, n_act*p)
        if routing.dense_gates is not None:
            z = z * routing.dense_gates
        if torch.is_grad_enabled() or y.dtype != z.dtype:
            return y + nn.functional.linear(z, b_flat).to(y.dtype)
        y2d = y.view(-1, self.out_features)  # inference: fused matmul-add into y, in place
        return y2d.addmm_(z.view(-1, z.shape[-1]), b_flat.T).view_as(y)

    def _gathered(self, x: Tensor, y: Tensor, routing: Routing) -> Tensor:
        """Each row applies only its own blocks, as per-(row, block) GEMMs.

        The A-side GEMM of a row has the same shape whatever else is in the batch, so the
        row does not pick up rounding from the blocks other rows use (the dense path's
        union-wide GEMM does). Measured: each row of a K=16 one-hot batch on SmolLM2 gives
        the same logits as when run alone, bit for bit, on CPU.
        """
        a_t, b_t = routing.weights(self)  # (batch*k, d_in, p), (batch, k*p, d_out)
        n, s, d = x.shape
        k = a_t.shape[0] // n
        xk = x if k == 1 else x.unsqueeze(1).expand(n, k, s, d).reshape(n * k, s, d)
        z = torch.bmm(xk, a_t)  # (batch*k, seq, p)
        if k > 1:
            z = z.view(n, k, s, -1).transpose(1, 2).reshape(n, s, -1)  # (batch, seq, k*p)
        z = z * routing.row_weights
        if torch.is_grad_enabled() or y.dtype != z.dtype:
            return y + torch.bmm(z, b_t).to(y.dtype)
        return y.baddbmm_(z, b_t)  # y += z @ b_t, in place

    def reference_delta(self, x: Tensor, scaled_gates: Tensor) -> Tensor:
        """Plain-loop ground truth: sum_k g_ik * B_k A_k x_i for every row i."""
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for i in range(x.shape[0]):
            for k in scaled_gates[i].nonzero().flatten().tolist():
                a, b = self.blocks(torch.tensor([k], device=x.device))
                out[i] += scaled_gates[i, k] * (x[i] @ a[0].T @ b[0].T)
        return out

    def blocks(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Blocks `idx` as (n, p, d_in) and (n, d_out, p); trainable copies take precedence."""
        if not self.trainable:
            return self.A.index_select(0, idx), self.B.index_select(0, idx)
        ids = idx.tolist()
        a = [self.trainable[str(k)] if str(k) in self.trainable else self.A[k] for k in ids]
        b = [self.trainable[f"B{k}"] if str(k) in self.trainable else self.B[k] for k in ids]
        return torch.stack(a), torch.stack(b)

    def grow(self, n_new: int) -> None:
        """Make room for `n_new` more blocks (zeros), doubling capacity to amortise copies."""
        need = self.n_blocks + n_new
        if need > self.A.shape[0]:
            cap = max(need, 2 * self.A.shape[0], 4)
            self.A = _resized(self.A, cap)
            self.B = _resized(self.B, cap)
        self.n_blocks = need

    def extra_repr(self) -> str:
        """Shape summary shown by print(model)."""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _few(names: Sequence[str]) -> str:
    return "[" + ", ".join(names[:3]) + (f", ... ({len(names)} in all)]" if len(names) > 3 else "]")


def _check_values(label: str, t: Tensor, dtype: torch.dtype) -> None:
    """Refuse a tensor of a dtype not in BLOCK_DTYPES, or not finite once converted to `dtype`."""
    if t.dtype not in BLOCK_DTYPES:
        raise BlockFormatError(
            f"{label} is {_dtype_name(t.dtype)}; block weights must be "
            f"{', '.join(map(_dtype_name, BLOCK_DTYPES))}"
        )
    if not torch.isfinite(t.to(dtype)).all():
        converted = (
            "" if t.dtype == dtype else f" once converted to the bank's {_dtype_name(dtype)}"
        )
        raise BlockFormatError(f"{label}: block weights hold NaN or inf{converted}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_block_path(path: Path) -> None:
    """Refuse a block path that is missing, a symbolic link or not a regular file (unopened)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise BlockFormatError(f"{path}: no such block file") from None
    except OSError as exc:
        raise BlockFormatError(f"{path}: cannot read the block file ({exc})") from None
    if stat.S_ISLNK(mode):
        raise BlockFormatError(f"{path} is a symbolic link; block files must be regular files")
    if not stat.S_ISREG(mode):
        raise BlockFormatError(f"{path} is not a regular file")


def _resized(t: Tensor, rows: int) -> Tensor:
    out = torch.zeros(rows, *t.shape[1:], dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


class LoRABank(nn.Module):
    """Wraps the targeted linears of a causal LM and manages their blocks."""

    def __init__(self, model: nn.Module, config: BankConfig | None = None) -> None:
        """Wrap `model`'s target linears in place. The model's base weights stay frozen."""
        super().__init__()
        self.config = config or BankConfig()
        self.slot = RoutingSlot()
        self.layers: dict[str, BlockLoRALinear] = {}
        self._wrap(model)
        if not self.layers:
            raise ValueError(f"no linear layer matches targets {self.config.targets}")
        self._modules_list = nn.ModuleList(self.layers.values())

    def _wrap(self, model: nn.Module) -> None:
        everything = ALL_LINEAR in self.config.targets
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if not isinstance(child, nn.Linear) or ".layers." not in f".{full}":
                    continue
                if everything or child_name in self.config.targets:
                    layer = BlockLoRALinear(child, self.config.rank, self.slot)
                    setattr(module, child_name, layer)
                    self.layers[full] = layer

    @property
    def n_blocks(self) -> int:
        """Number of blocks (characters) in the bank."""
        return next(iter(self.layers.values())).n_blocks

    @property
    def module_names(self) -> list[str]:
        """Full names of the wrapped linear layers, in model order."""
        return list(self.layers)

    # -- routing -----------------------------------------------------------------------

    def gate_matrix(self, gates: Sequence[Gate | None]) -> Tensor:
        """Stack per-row gates into a (batch, N) tensor, checking every index and weight."""
        layer = next(iter(self.layers.values()))
        out = torch.zeros(len(gates), self.n_blocks, dtype=torch.float32)
        for i, gate in enumerate(gates):
            for k, w in (gate or {}).items():
                if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.n_blocks:
                    raise GateError(
                        f"row {i}: block {k!r} does not exist (bank has {self.n_blocks})"
                    )
                if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                    raise GateError(f"row {i}: weight {w!r} for block {k} is not a finite number")
                out[i, k] = float(w)
        return out.to(device=layer.A.device, dtype=layer.A.dtype)

    def routing(
        self, gates: Tensor | Sequence[Gate | None], path: LoRAPath | None = None
    ) -> Routing:
        """Prepare per-row gates ((batch, N) tensor or one Gate per row) for the layers."""
        if not isinstance(gates, Tensor):
            gates = self.gate_matrix(gates)
        elif gates.dim() != 2 or gates.shape[1] != self.n_blocks:
            raise GateError(f"gates must be (batch, {self.n_blocks}), got {tuple(gates.shape)}")
        elif not torch.isfinite(gates).all():
            raise GateError("gates hold NaN or inf")
        return Routing(gates, self.config.scale, self.config.rank, path or self.config.path)

    @contextmanager
    def route(self, routing: Routing | Tensor | Sequence[Gate | None]) -> Iterator[Routing]:
        """Install a routing for the forwards inside the block; always removed on exit."""
        if not isinstance(routing, Routing):
            routing = self.routing(routing)
        if self.slot.routing is not None:
            raise RuntimeError("a routing is already installed on this bank (nested route())")
        self.slot.routing = routing
        try:
            yield routing
        finally:
            self.slot.routing = None

    # -- blocks ------------------------------------------------------------------------

    def add_blocks(
        self,
        n: int = 1,
        init: Literal["zeros", "lora", "random"] = "lora",
        generator: torch.Generator | None = None,
        b_scale: float = 1.0,
    ) -> list[int]:
        """Append `n` blocks and return their indices.

        `lora` initialises A uniformly with std ~ 1/sqrt(3 d_in) and B to zero, so a new
        block starts as the base model; `random` also draws B (times `b_scale`), for tests
        and benchmarks. Existing blocks are not touched.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"number of blocks to add must be a positive integer, got {n!r}")
        if init not in ("zeros", "lora", "random"):
            raise ValueError(f"init must be zeros, lora or random, got {init!r}")
        start = self.n_blocks
        for layer in self.layers.values():
            layer.grow(n)
            if init == "zeros":
                continue
            a = torch.empty(n, *layer.A.shape[1:]).uniform_(-1, 1, generator=generator)
            layer.A[start : start + n] = a / math.sqrt(layer.in_features)
            if init == "random":
                b = torch.empty(n, *layer.B.shape[1:]).uniform_(-1, 1, generator=generator)
                layer.B[start : start + n] = b * (b_scale / math.sqrt(layer.rank))
        return list(range(start, start + n))

    def get_block(self, k: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Block `k` as {module name: (A (p, d_in), B (d_out, p))} (copies)."""
        self._check_index(k)
        out = {}
        for name, layer in self.layers.items():
            a, b = layer.blocks(torch.tensor([k], device=layer.A.device))
            out[name] = (a[0].detach().clone(), b[0].detach().clone())
        return out

    def set_block(self, k: int, weights: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Overwrite block `k`; every module's weights are checked before any is written."""
        self._check_index(k)
        self.check_weights(weights)
        with torch.no_grad():
            for name, layer in self.layers.items():
                a, b = weights[name]
                layer.A[k] = a.to(layer.A)
                layer.B[k] = b.to(layer.B)

    def add_block(self, weights: Mapping[str, tuple[Tensor, Tensor]]) -> int:
        """Append one block holding `weights` (checked first; the bank is unchanged on error)."""
        self.check_weights(weights)
        (k,) = self.add_blocks(1, init="zeros")
        self.set_block(k, weights)
        return k

    def train_blocks(self, blocks: Sequence[int]) -> list[nn.Parameter]:
        """Give `blocks` trainable copies; every other block stays frozen and gets no gradient."""
        params = []
        for k in blocks:
            self._check_index(k)
            for layer in self.layers.values():
                layer.trainable[str(k)] = nn.Parameter(layer.A[k].clone())
                layer.trainable[f"B{k}"] = nn.Parameter(layer.B[k].clone())
                params += [layer.trainable[str(k)], layer.trainable[f"B{k}"]]
        return params

    def freeze(self) -> None:
        """Write trainable copies back into the bank and drop them."""
        with torch.no_grad():
            for layer in self.layers.values():
                for key, p in layer.trainable.items():
                    if key.startswith("B"):
                        layer.B[int(key[1:])] = p.detach()
                    else:
                        layer.A[int(key)] = p.detach()
                layer.trainable = nn.ParameterDict()

    def _check_index(self, k: int) -> None:
        if not isinstance(k, int) or not 0 <= k < self.n_blocks:
            raise GateError(f"block {k!r} does not exist (bank has {self.n_blocks})")

    def check_weights(self, weights: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Raise BlockFormatError unless `weights` fit every layer (names, shapes, values)."""
        missing = [n for n in self.layers if n not in weights]
        extra = [n for n in weights if n not in self.layers]
        if missing or extra:
            raise BlockFormatError(
                f"block does not fit this bank: missing modules {_few(missing)}, "
                f"unexpected modules {_few(extra)}"
            )
        for name, (a, b) in weights.items():
            layer = self.layers[name]
            want_a, want_b = (layer.rank, layer.in_features), (layer.out_features, layer.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise BlockFormatError(
                    f"{name}: expected A {want_a} and B {want_b}, got "
                    f"A {tuple(a.shape)} and B {tuple(b.shape)}"
                )
            for part, t in (("lora_A", a), ("lora_B", b)):
                _check_values(f"{name}.{part}", t, layer.A.dtype)

    # -- files -------------------------------------------------------------------------

    def save_block(self, k: int, path: str | Path, meta: Mapping[str, str] | None = None) -> Path:
        """Write block `k` as safetensors (atomically: temp file, then rename)."""
        return self.save_blocks([k], path, meta)

    def save_blocks(
        self, ks: Sequence[int], path: str | Path, meta: Mapping[str, str] | None = None
    ) -> Path:
        """Write blocks `ks` as one LoRA of rank len(ks)*p (A stacked, B side by side).

        The sum of the blocks at gate weight 1 is exactly that LoRA; `read_blocks` splits
        it back. Written atomically (temp file, then rename).
        """
        if not ks:
            raise ValueError("no blocks to save")
        path = Path(path)
        parts = [self.get_block(k) for k in ks]
        tensors = {}
        for name in self.module_names:
            a = torch.cat([part[name][0] for part in parts])  # (len*p, d_in)
            b = torch.cat([part[name][1] for part in parts], dim=1)  # (d_out, len*p)
            tensors[f"{name}.lora_A"] = a.float().contiguous().cpu()
            tensors[f"{name}.lora_B"] = b.float().contiguous().cpu()
        metadata = {
            "format": BLOCK_FORMAT,
            "version": BLOCK_VERSION,
            "rank": str(self.config.rank * len(ks)),
            "alpha": repr(self.config.alpha * len(ks)),
            "modules": json.dumps(self.module_names),
            **(meta or {}),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def read_block(self, path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
        """Read and check a one-block file written by `save_block`; the bank is not changed.

        The file must be a regular file (not a symbolic link) holding float32, float16 or
        bfloat16 tensors that stay finite in the bank's dtype; raises BlockFormatError.
        """
        blocks = self.read_blocks(path)
        if len(blocks) != 1:
            raise BlockFormatError(
                f"{path}: holds {len(blocks)} blocks (rank {len(blocks) * self.config.rank}); "
                f"a character's block has rank {self.config.rank}"
            )
        return blocks[0]

    def read_blocks(self, path: str | Path) -> list[dict[str, tuple[Tensor, Tensor]]]:
        """Read a file of `save_blocks` (rank a multiple of p) as its blocks; bank unchanged."""
        path = Path(path)
        _check_block_path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise BlockFormatError(f"{path}: no such block file") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise BlockFormatError(f"{path} is not a safetensors block file ({exc})") from None
        if meta.get("format") != BLOCK_FORMAT:
            raise BlockFormatError(f"{path}: not a Neeko block (format={meta.get('format')!r})")
        if meta.get("version") != BLOCK_VERSION:
            raise BlockFormatError(
                f"{path}: block format version {meta.get('version')!r} is not supported "
                f"(this Neeko reads version {BLOCK_VERSION})"
            )
        p = self.config.rank
        rank = meta.get("rank", "")
        n = int(rank) // p if rank.isdigit() and int(rank) % p == 0 else 0
        if n < 1 or _float(meta.get("alpha")) != self.config.alpha * n:
            raise BlockFormatError(
                f"{path}: block has rank {meta.get('rank')} alpha {meta.get('alpha')}, "
                f"this bank has rank {p} alpha {self.config.alpha}"
            )
        stacked: dict[str, tuple[Tensor, Tensor]] = {}
        names = {k.rsplit(".", 1)[0] for k in tensors}
        for name in names:
            if f"{name}.lora_A" not in tensors or f"{name}.lora_B" not in tensors:
                raise BlockFormatError(f"{path}: {name} lacks lora_A or lora_B")
            stacked[name] = (tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"])
        if len(tensors) != 2 * len(names):
            raise BlockFormatError(f"{path}: unexpected tensors besides lora_A / lora_B pairs")
        blocks: list[dict[str, tuple[Tensor, Tensor]]] = [{} for _ in range(n)]
        for name, (a, b) in stacked.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != n * p or b.shape[1] != n * p:
                raise BlockFormatError(
                    f"{path}: {name}: expected A ({n * p}, d_in) and B (d_out, {n * p}), got "
                    f"A {tuple(a.shape)} and B {tuple(b.shape)}"
                )
            for j in range(n):
                blocks[j][name] = (a[j * p : (j + 1) * p], b[:, j * p : (j + 1) * p])
        try:
            for weights in blocks:
                self.check_weights(weights)
        except BlockFormatError as exc:
            raise BlockFormatError(f"{path}: {exc}") from None
        return blocks

    def load_blocks(self, path: str | Path) -> list[int]:
        """Append the blocks of a `save_blocks` file (all checked first); their slots."""
        return [self.add_block(weights) for weights in self.read_blocks(path)]

    def load_block(self, path: str | Path, index: int | None = None) -> int:
        """Load a block file into slot `index` (or a new slot); returns the slot."""
        weights = self.read_block(path)
        if index is None:
            return self.add_block(weights)
        self.set_block(index, weights)
        return index
