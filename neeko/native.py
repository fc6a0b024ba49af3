"""The native decode step: `neeko/csrc/decode_one.c`, built at first use.

A decode step on the CPU, with fp32 weights or int8 ones (one scale per output row), is
one OpenMP parallel region in C that reads every weight once (see the source's header):
for one row a streamed product-sum per weight row, for several rows one broadcast FMA per
weight into a vector holding the rows. It computes what `StaticDecoder._forward` computes,
and `StaticDecoder` calls it instead of the compiled graph for the row counts where it is
faster (`BATCH_ROWS`). The library is
compiled with the system C compiler (`$CC`, else `cc`) into Neeko's cache, keyed by the
source, the flags, the compiler and the CPU; where none can be built (no compiler,
`NEEKO_NATIVE=0`) the compiled graph runs instead, with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from neeko.model import cache_dir

if TYPE_CHECKING:
    from neeko.compiled import LoRAInputs, StaticDecoder, _Linear

SOURCE = Path(__file__).parent / "csrc" / "decode_one.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
NATIVE_WEIGHTS = ("fp32", "int8")
"""The weight storages of `neeko.compiled` the native step reads."""
BATCH_ROWS = {"fp32": (2, 64), "int8": (8, 64)}
"""Per weight storage, the row counts from which to which a step of several rows runs
natively, where it beat the compiled graph side by side (real model, 2-core AVX-512 CPU):
fp32 2.8x at 16 rows, 1.65x at 64; int8 1.4x at 8 rows, 1.55x at 16, but at 2 and 4
rows torch's int8 kernel won (the native step widens each int8 weight to fp32 once per
step, as many operations as the multiply-adds themselves at 16 rows)."""
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a decoder layer, in the order of the source's `enum`."""
log = logging.getLogger(__name__)
_P = ctypes.c_void_p
_I = ctypes.c_int64


class _Lora(ctypes.Structure):
    _fields_ = (("a", _P), ("b", _P), ("w", _P), ("kp", _I))


class _Mat(ctypes.Structure):
    _fields_ = (("w", _P), ("scale", _P))


class _Model(ctypes.Structure):
    _fields_ = (
        *((name, _I) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim")),
        *((name, _I) for name in ("inter", "vocab", "window", "threads")),
        ("eps", ctypes.c_float),
        *((name, _P) for name in ("qkv", "qkv_bias", "o", "gate_up", "down", "ln_in")),
        *((name, _P) for name in ("ln_post", "norm", "embed")),
        ("head", _Mat),
        ("lora", _Lora * len(PROJECTIONS)),
    )


class _Step(ctypes.Structure):
    _fields_ = (
        ("token", _I),
        ("position", _I),
        *((name, _P) for name in ("cos", "sin", "keys", "values")),
        *((name, _I) for name in ("layer_stride", "head_stride", "column_stride")),
        *((name, _P) for name in ("logits", "new_k", "new_v")),
        ("write", _I),
    )


class _Batch(ctypes.Structure):
    _fields_ = (
        *((name, _I) for name in ("rows", "slots")),
        *((name, _P) for name in ("tokens", "positions", "cos", "sin", "keys", "values")),
        *((name, _I) for name in ("layer_stride", "slot_stride", "head_stride", "column_stride")),
        *((name, _P) for name in ("logits", "new_k", "new_v")),
        ("write", _I),
        ("lora", _Lora * len(PROJECTIONS)),
    )


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library (built now if need be), or None where it cannot be built."""
    if os.environ.get("NEEKO_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        source = SOURCE.read_bytes()
        key = hashlib.sha256(
            b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu().encode()])
        ).hexdigest()[:16]
        target = cache_dir() / "native" / f"decode_one-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run(
                    [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=300,
                )
                os.replace(built, target)  # atomic: concurrent builders all end up here
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("native decode step unavailable (%s); using the compiled graph", detail)
        return None
    lib.neeko_decode_one.argtypes = (ctypes.POINTER(_Model), ctypes.POINTER(_Step))
    lib.neeko_decode_one.restype = ctypes.c_int
    lib.neeko_decode_batch.argtypes = (ctypes.POINTER(_Model), ctypes.POINTER(_Batch))
    lib.neeko_decode_batch.restype = ctypes.c_int
    lib.neeko_read.argtypes = (_P, _P, _I, _I)
    lib.neeko_read.restype = ctypes.c_double
    return lib


def reader(tensors: list[Tensor], lib: ctypes.CDLL) -> Callable[[], float]:
    """A function that reads every byte of `tensors` (contiguous fp32) once and sums them.

    One parallel region, array after array, as the native step streams its weights: the
    read a decode step of these weights cannot beat.
    """
    if any(not t.is_contiguous() or t.dtype != torch.float32 for t in tensors):
        raise ValueError("reader needs contiguous fp32 tensors")
    arrays = (_P * len(tensors))(*(t.data_ptr() for t in tensors))
    sizes = (_I * len(tensors))(*(t.numel() for t in tensors))
    threads = torch.get_num_threads()

    def read() -> float:
        _ = tensors  # keep the memory alive as long as the reader
        return lib.neeko_read(arrays, sizes, len(tensors), threads)

    return read


def _io(
    keys: Tensor, values: Tensor, logits: Tensor, new_k: Tensor, new_v: Tensor, write: bool
) -> dict[str, int]:
    """The cache and output fields shared by `_Step` and `_Batch`."""
    return {
        "keys": keys.data_ptr(),
        "values": values.data_ptr(),
        "layer_stride": keys.stride(0),
        "head_stride": keys.stride(2),
        "column_stride": keys.stride(3),
        "logits": logits.data_ptr(),
        "new_k": new_k.data_ptr(),
        "new_v": new_v.data_ptr(),
        "write": int(write),
    }


def _cpu() -> str:
    """What `-march=native` depends on: the machine and its CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def supports(decoder: StaticDecoder) -> bool:
    """Whether the native step reproduces `decoder` (fp32 or int8 weights on the CPU, SiLU)."""
    return (
        decoder.device.type == "cpu"
        and decoder.weights in NATIVE_WEIGHTS
        and decoder.dtype == torch.float32
        and decoder.act_name == "silu"
        and decoder.n_heads % decoder.n_kv == 0
    )


class NativeStep:
    """`StaticDecoder`'s step through the native library: one row (call) or several (`batch`)."""

    def __init__(self, decoder: StaticDecoder, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.decoder = decoder
        layers = decoder.layers
        self._keep: list[object] = []  # everything the structs point into
        self._lora_src: LoRAInputs | None = None
        self._lora_kept: list[Tensor] = []

        def table(tensors: list[Tensor]) -> int:
            for t in tensors:
                if not t.is_contiguous() or t.dtype != torch.float32:
                    raise ValueError("native step needs contiguous fp32 weights")
            array = (_P * len(tensors))(*(t.data_ptr() for t in tensors))
            self._keep.append((tensors, array))
            return ctypes.addressof(array)

        def mats(linears: list[_Linear]) -> int:
            array = (_Mat * len(linears))(*(self._mat(lin) for lin in linears))
            self._keep.append(array)
            return ctypes.addressof(array)

        head = decoder.head
        self.model = _Model(
            layers=decoder.n_layers,
            hidden=decoder.embed.shape[1],
            heads=decoder.n_heads,
            kv_heads=decoder.n_kv,
            head_dim=decoder.head_dim,
            inter=layers[0].inter,
            vocab=head.weight.shape[0],
            window=decoder.window,
            threads=torch.get_num_threads(),
            eps=decoder.eps,
            qkv=mats([layer.qkv for layer in layers]),
            qkv_bias=table([layer.qkv.bias for layer in layers])
            if layers[0].qkv.bias is not None
            else None,
            o=mats([layer.o for layer in layers]),
            gate_up=mats([layer.gate_up for layer in layers]),
            down=mats([layer.down for layer in layers]),
            ln_in=table([layer.ln_in for layer in layers]),
            ln_post=table([layer.ln_post for layer in layers]),
            norm=decoder.norm.data_ptr(),
            embed=decoder.embed.data_ptr(),
            head=self._mat(head),
        )
        if not decoder.embed.is_contiguous() or decoder.embed.dtype != torch.float32:
            raise ValueError("native step needs a contiguous fp32 embedding")
        if any(getattr(layer, n).bias is not None for layer in layers for n in ("o", "down")):
            raise ValueError("native step has no bias on o_proj or down_proj")
        if any(layer.gate_up.bias is not None for layer in layers) or head.bias is not None:
            raise ValueError("native step has no bias on gate/up or the head")

    def _mat(self, linear: _Linear) -> _Mat:
        """`linear`'s weight for the C step: fp32, or int8 with fp32 row scales (kept)."""
        w = linear.weight
        if not w.is_contiguous() or w.dtype not in (torch.float32, torch.int8):
            raise ValueError("native step needs contiguous fp32 or int8 weights")
        if w.dtype == torch.float32:
            return _Mat(w.data_ptr(), None)
        scale = linear.scale.float().contiguous()
        self._keep.append(scale)
        return _Mat(w.data_ptr(), scale.data_ptr())

    def _set_lora(self, lora: LoRAInputs | None) -> None:
        """Point the model's block slots at row 0 of `lora` (kept until the next gates)."""
        kept = self._point(self.model.lora, lora, lambda a, b, w: (a[:, 0], b[:, 0], w[0]))
        self._lora_src, self._lora_kept = lora, kept

    def _point(
        self,
        slots: ctypes.Array[_Lora],
        lora: LoRAInputs | None,
        pick: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    ) -> list[Tensor]:
        """Point `slots` (one per projection) at `pick` of each wrapped projection's blocks.

        `pick` takes `lora`'s (a, b, w) and returns what C reads (made contiguous); the
        other projections point at none. Returns those tensors, to be kept alive.
        """
        dec, kept = self.decoder, []
        for i, name in enumerate(PROJECTIONS):
            slot = slots[i]
            if lora is None or name not in dec.targets:
                slot.a = slot.b = slot.w = None
                slot.kp = 0
                continue
            j = dec.targets.index(name)
            a, b, w = (t.contiguous() for t in pick(lora.a[j], lora.b[j], lora.w))
            kept += (a, b, w)
            slot.a, slot.b, slot.w, slot.kp = a.data_ptr(), b.data_ptr(), w.data_ptr(), a.shape[-2]
        return kept

    def __call__(
        self,
        tokens: Tensor,
        positions: Tensor,
        keys: Tensor,
        values: Tensor,
        cos: Tensor,
        sin: Tensor,
        lora: LoRAInputs | None,
        write: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """As `StaticDecoder.step` for one row: logits (1, vocab), new keys and values."""
        m = self.model
        position = int(positions[0])
        if keys.stride(4) != 1 or values.stride() != keys.stride():
            raise ValueError("native step needs the cache layout of `StaticDecoder.step`")
        token = int(tokens[0])
        if not 0 <= token < m.vocab or not 0 <= position < keys.shape[3]:
            raise ValueError(f"token {token} or position {position} out of range")
        if lora is not self._lora_src:
            self._set_lora(lora)
        cos_row, sin_row = cos[position].contiguous(), sin[position].contiguous()
        logits = torch.empty(1, m.vocab)
        new_k = torch.empty(m.layers, 1, m.kv_heads, m.head_dim)
        new_v = torch.empty_like(new_k)
        step = _Step(
            token=token,
            position=position,
            cos=cos_row.data_ptr(),
            sin=sin_row.data_ptr(),
            **_io(keys, values, logits, new_k, new_v, write),
        )
        if self.lib.neeko_decode_one(ctypes.byref(m), ctypes.byref(step)):
            raise MemoryError("native decode step: out of memory")
        return logits, new_k, new_v

    def batch(
        self,
        tokens: Tensor,
        positions: Tensor,
        keys: Tensor,
        values: Tensor,
        cos: Tensor,
        sin: Tensor,
        lora: LoRAInputs | None,
        write: bool = False,
        live: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """As `StaticDecoder.step` for any rows: the first `live` of them are computed.

        Rows past `live` are padding: their logits and keys/values come back zero and the
        cache is left as it was for them.
        """
        m, dec = self.model, self.decoder
        if dec.weights not in BATCH_ROWS:
            raise ValueError(f"the native batch step reads {tuple(BATCH_ROWS)} weights only")
        slots = int(tokens.shape[0])
        rows = slots if live is None else live
        if not 0 < rows <= slots or keys.shape[1] < slots:
            raise ValueError(f"{rows} live rows of {slots}, cache of {keys.shape[1]} slots")
        if keys.stride(4) != 1 or values.stride() != keys.stride():
            raise ValueError("native step needs the cache layout of `StaticDecoder.step`")
        tokens = tokens[:rows].to(torch.int64).contiguous()
        positions = positions[:rows].to(torch.int64).contiguous()
        if int(positions.max()) >= keys.shape[3] or int(positions.min()) < 0:
            raise ValueError("a position is out of range of the cache's columns")
        if int(tokens.min()) < 0 or int(tokens.max()) >= m.vocab:
            raise ValueError("a token is out of range of the vocabulary")
        cos, sin = cos.contiguous(), sin.contiguous()
        logits = torch.zeros(slots, m.vocab)
        new_k = torch.zeros(m.layers, slots, m.kv_heads, m.head_dim)
        new_v = torch.zeros_like(new_k)
        step = _Batch(
            rows=rows,
            slots=slots,
            tokens=tokens.data_ptr(),
            positions=positions.data_ptr(),
            cos=cos.data_ptr(),
            sin=sin.data_ptr(),
            slot_stride=keys.stride(1),
            **_io(keys, values, logits, new_k, new_v, write),
        )
        if lora is not None:
            rows_of = [t.shape[1] for t in (*lora.a, *lora.b)] + [lora.w.shape[0]]
            if any(n != slots for n in rows_of):
                raise ValueError("the blocks' inputs must have one row per slot")
        kept = self._point(step.lora, lora, lambda a, b, w: (a, b, w))  # alive while C reads
        if self.lib.neeko_decode_batch(ctypes.byref(m), ctypes.byref(step)):
            raise MemoryError("native decode step: out of memory")
        del kept
        return logits, new_k, new_v
