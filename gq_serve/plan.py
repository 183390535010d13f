"""`gq plan`: what fits on a card before quantizing, computed from a model's config and datasheets.

Pure arithmetic, no GPU and no weights: for a model (a bundled public config or any Hugging Face
``config.json``), a card (bundled datasheet figures) and a checkpoint format (``fp16`` or a
registered quantization format at one of its bit widths) it computes

- the weight bytes: every decoder linear (q/k/v/o, gate/up/down) stored as the format's tensors
  (``gq_kernels`` registry, so a new format is counted without changes here), the dense parts in
  fp16 (embeddings, lm_head unless tied, norms, biases);
- the KV cache bytes per token (fp16 K and V);
- the largest context at batch 1 and the largest batch at one context that fit in the card's memory
  minus a reserve minus the weights;
- an upper bound on batch-1 decode tokens/s from the datasheet memory bandwidth.

Units: bytes are ``int`` bytes; ``*_gib`` are GiB (2**30 bytes); bandwidths are GB/s (1e9 bytes/s),
as datasheets give them; tokens/s are tokens per second. Nothing here is measured.

Only :func:`format_variants` and :func:`weight_bytes` touch the format registry; they never name a
format: parameters are built generically (``bits`` and, where the format takes one, the group size).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
FP16_BYTES = 2
DENSE = "fp16"  # the unquantized row: every weight in fp16
DEFAULT_RESERVE_GIB = 1.5  # CUDA context, activations, allocator slack (GiB)
DEFAULT_CONTEXT = 4096  # tokens: context of the "max batch" column and of the decode bound
DEFAULT_GROUP_SIZE = 128  # inputs per group, for formats whose parameters take a group size


# ------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-style decoder (Llama, Mistral, Qwen2, ...): what the weights and the KV
    cache depend on. Sizes are counts (features, heads, layers, tokens)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int  # tokens
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    biases: tuple[str, ...] = ()  # decoder linears that have a bias (Qwen2: q, k, v)

    @property
    def head_size(self) -> int:
        """Features per attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


# Public config.json values (Hugging Face hub, the base models). The Instruct variants have the
# same shapes; Qwen2.5-*-Instruct's config.json says max_position_embeddings 32768 (131072 with YaRN).
_QKV = ("q_proj", "k_proj", "v_proj")
BUNDLED_MODELS: dict[str, ModelConfig] = {m.name: m for m in (
    ModelConfig("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, False, 4096),
    ModelConfig("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000, False, 4096),
    ModelConfig("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, False, 8192),
    ModelConfig("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False, 131072, biases=_QKV),
    ModelConfig("Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, False, 131072, biases=_QKV),
    ModelConfig("Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False, 131072, biases=_QKV),
)}


def model_from_hf_config(cfg: dict, name: str) -> ModelConfig:
    """A :class:`ModelConfig` from the fields of a Hugging Face ``config.json`` (a dense
    Llama-style decoder; a multimodal config's ``text_config`` is used when present).

    Bias: ``attention_bias`` when the config has it (Llama: q/k/v/o), else q/k/v for ``qwen2``;
    ``mlp_bias`` adds gate/up/down. Without ``max_position_embeddings`` the context cap is 4096
    tokens. Raises ValueError for a missing field or a mixture of experts.
    """
    cfg = cfg.get("text_config") or cfg
    if any(cfg.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ValueError(f"{name}: a mixture-of-experts config; gq plan counts dense decoders only")
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int)]
    if missing:
        raise ValueError(f"{name}: config.json lacks {', '.join(missing)}")
    attention_bias = cfg.get("attention_bias")
    if attention_bias is None:
        biases = _QKV if cfg.get("model_type") == "qwen2" else ()
    else:
        biases = (*_QKV, "o_proj") if attention_bias else ()
    if cfg.get("mlp_bias"):
        biases = (*biases, "gate_proj", "up_proj", "down_proj")
    return ModelConfig(
        name=name,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        vocab_size=cfg["vocab_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings") or DEFAULT_CONTEXT,
        head_dim=cfg.get("head_dim") or None,
        biases=biases,
    )


def resolve_model(spec: str | ModelConfig) -> ModelConfig:
    """A bundled model by name (case-insensitive, e.g. ``llama-2-7b``), or the ``config.json`` at a
    path (the file, or a model directory holding it). An existing path wins over a bundled name.
    Raises ValueError naming the bundled models when ``spec`` is neither."""
    if isinstance(spec, ModelConfig):
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"{path} has no config.json")
        try:
            cfg = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: not a readable JSON config ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{file}: not a JSON object")
        return model_from_hf_config(cfg, path.name if path.is_dir() else path.parent.name or str(path))
    by_lower = {n.lower(): m for n, m in BUNDLED_MODELS.items()}
    if spec.lower() in by_lower:
        return by_lower[spec.lower()]
    raise ValueError(f"unknown model {spec!r}: not a path to a config.json or model directory, and not a "
                     f"bundled model (one of {', '.join(BUNDLED_MODELS)})")


def decoder_linears(model: ModelConfig) -> list[tuple[str, int, int]]:
    """The linears of one decoder layer as (name, out_features, in_features)."""
    h, i, d = model.hidden_size, model.intermediate_size, model.head_size
    q, kv = model.num_attention_heads * d, model.num_key_value_heads * d
    return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


def dense_parts(model: ModelConfig) -> dict[str, int]:
    """Parameter counts of what stays fp16 in every checkpoint: ``embed_tokens``, ``lm_head`` (0
    when tied to the embeddings), ``norms`` (two RMSNorm weights per layer + the final one) and
    ``biases`` (of the decoder linears that have one)."""
    h, v, n = model.hidden_size, model.vocab_size, model.num_hidden_layers
    outs = {name: out for name, out, _ in decoder_linears(model)}
    return {
        "embed_tokens": v * h,
        "lm_head": 0 if model.tie_word_embeddings else v * h,
        "norms": (2 * n + 1) * h,
        "biases": n * sum(outs[b] for b in model.biases),
    }


def parameter_count(model: ModelConfig) -> int:
    """All parameters: the decoder linears plus :func:`dense_parts`."""
    linears = sum(o * i for _, o, i in decoder_linears(model)) * model.num_hidden_layers
    return linears + sum(dense_parts(model).values())


# ------------------------------------------------------------------------------------------- cards
@dataclass(frozen=True)
class Card:
    """A GPU as its datasheet gives it: memory (GiB: GDDR capacities are powers of two, so the
    datasheet's "24 GB" is 24 GiB) and memory bandwidth (GB/s, 1e9 bytes/s)."""

    name: str
    memory_gib: float
    bandwidth_gbs: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


BUNDLED_CARDS: dict[str, Card] = {c.name: c for c in (
    Card("RTX 3090", 24, 936),
    Card("RTX 4090", 24, 1008),
    Card("RTX 5090", 32, 1792),
    Card("RTX 4060 Ti 16GB", 16, 288),
)}


def _card_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_card(spec: str | Card) -> Card:
    """A bundled card by name; case, spaces and hyphens are ignored and ``RTX`` may be left out
    (``rtx4090``, ``4090``, ``4060 Ti 16GB``). Raises ValueError naming the bundled cards."""
    if isinstance(spec, Card):
        return spec
    key = _card_key(spec)
    for name, card in BUNDLED_CARDS.items():
        if key and key in (_card_key(name), _card_key(name).removeprefix("rtx")):
            return card
    raise ValueError(f"unknown card {spec!r}; bundled cards: {', '.join(BUNDLED_CARDS)}")


# ----------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class Variant:
    """One way to store the decoder linears: ``format`` is ``fp16`` (``params`` None) or a
    registered format with its validated parameters."""

    format: str
    bits: int
    params: object = None  # gq_kernels.format.FormatParams

    @property
    def group_size(self) -> int | None:
        """Inputs per group, when the format's parameters have a (positive) group size."""
        gs = getattr(self.params, "group_size", None)
        return gs if isinstance(gs, int) and gs > 0 else None

    @property
    def label(self) -> str:
        if self.params is None:
            return DENSE
        return f"{self.format} {self.bits}-bit" + (f" g{self.group_size}" if self.group_size else "")


def format_params(fmt: str, bits: int, group_size: int = DEFAULT_GROUP_SIZE):
    """Validated parameters of registered format ``fmt`` at ``bits``: with ``group_size`` when its
    parameters accept one, else ``bits`` alone. Raises ValueError when ``bits`` is unsupported or
    the format needs parameters beyond these."""
    from pydantic import ValidationError

    from gq_kernels.registry import get_format

    f = get_format(fmt)
    supported = tuple(f.Params.supported_bits)
    if bits not in supported:
        raise ValueError(f"format {fmt!r} supports bits {list(supported)}, got {bits}")
    try:
        return f.params(bits=bits, group_size=group_size)
    except ValidationError:
        pass
    try:
        return f.params(bits=bits)
    except ValidationError as e:
        raise ValueError(f"format {fmt!r}: cannot build parameters from bits={bits} "
                         f"(group_size={group_size}): {e.errors()[0]['msg']}") from None


def format_variants(formats: list[str] | None = None, bits: list[int] | None = None,
                    group_size: int = DEFAULT_GROUP_SIZE) -> list[Variant]:
    """``fp16`` then every registered format at each of its supported bit widths (widest first),
    restricted to ``formats`` / ``bits`` when given (``fp16`` counts as 16 bits). Formats whose
    parameters cannot be built from bits (and a group size) alone are left out unless asked for.
    Raises ValueError for an unknown format or when nothing matches."""
    from gq_kernels.registry import format_names, get_format

    known = [DENSE, *format_names()]
    for f in formats or ():
        if f not in known:
            raise ValueError(f"unknown format {f!r}; formats: {', '.join(known)}")
    out = []
    for f in known:
        if formats and f not in formats:
            continue
        if f == DENSE:
            if not bits or 16 in bits:
                out.append(Variant(DENSE, 16))
            continue
        for b in sorted(get_format(f).Params.supported_bits, reverse=True):
            if bits and b not in bits:
                continue
            try:
                out.append(Variant(f, b, format_params(f, b, group_size)))
            except ValueError:
                if formats:
                    raise
    if not out:
        supported = {f: ([16] if f == DENSE else list(get_format(f).Params.supported_bits))
                     for f in (formats or known)}
        raise ValueError(f"no format matches bits {bits}; supported bits: "
                         + "; ".join(f"{f}: {b}" for f, b in supported.items()))
    return out


# ------------------------------------------------------------------------------------ the arithmetic
def linear_bytes(variant: Variant, out_features: int, in_features: int) -> int:
    """Bytes of one [out, in] linear's weight: fp16, or the sum of the format's tensors (shape
    product x element size) as the registry declares them. The bias is not included."""
    if variant.params is None:
        return out_features * in_features * FP16_BYTES
    from gq_kernels.registry import get_format

    specs = get_format(variant.format).tensors(variant.params, out_features, in_features)
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in specs.values())


def weight_bytes(model: ModelConfig, variant: Variant) -> dict[str, int]:
    """Checkpoint weight bytes: ``linears`` (every decoder linear in ``variant``), ``dense`` (the
    fp16 :func:`dense_parts`), ``embed_tokens`` (of which the input embedding table) and ``total``."""
    per_layer = sum(linear_bytes(variant, o, i) for _, o, i in decoder_linears(model))
    linears = per_layer * model.num_hidden_layers
    dense = sum(dense_parts(model).values()) * FP16_BYTES
    return {"linears": linears, "dense": dense, "embed_tokens": dense_parts(model)["embed_tokens"] * FP16_BYTES,
            "total": linears + dense}


def kv_bytes_per_token(model: ModelConfig, bytes_per_element: int = FP16_BYTES) -> int:
    """KV cache bytes per token: K and V of every layer, ``2 * layers * kv_heads * head_dim *
    bytes_per_element`` (fp16: 2 bytes)."""
    return 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_size * bytes_per_element


def fit(weights: int, kv_per_token: int, memory: int, reserve: int, max_context: int,
        context: int) -> dict:
    """What fits once the weights are loaded. All sizes in bytes, contexts in tokens.

    ``free = memory - reserve - weights``; ``max_kv_tokens = floor(free / kv_per_token)`` (0 when
    free < one token: ``fits`` is False). ``max_context_batch1`` is that capped at ``max_context``
    (the model's max_position_embeddings); ``max_batch`` is how many sequences of
    ``min(context, max_context)`` tokens fit together.
    """
    free = memory - reserve - weights
    tokens = max(free, 0) // kv_per_token
    ctx = min(context, max_context)
    return {"free_bytes": free, "fits": tokens >= 1, "max_kv_tokens": tokens,
            "max_context_batch1": min(tokens, max_context), "context": ctx, "max_batch": tokens // ctx}


def decode_bound(streamed_weights: int, kv_per_token: int, context: int, bandwidth_gbs: float) -> float:
    """Upper bound on batch-1 decode tokens/s: each new token reads ``streamed_weights`` bytes and
    the KV cache of ``context`` tokens once, at the full ``bandwidth_gbs`` (GB/s). Real decoding is
    slower (kernel efficiency, launches, attention and sampling compute)."""
    return bandwidth_gbs * 1e9 / (streamed_weights + kv_per_token * context)


def plan_rows(model: str | ModelConfig, cards: list[str | Card] | None = None,
              formats: list[str] | None = None, bits: list[int] | None = None,
              context: int = DEFAULT_CONTEXT, reserve_gib: float = DEFAULT_RESERVE_GIB,
              group_size: int = DEFAULT_GROUP_SIZE) -> list[dict]:
    """One row per (card, format variant) for ``model`` (a name, a config path or a ModelConfig);
    all bundled cards and every format variant (:func:`format_variants`) unless restricted.

    ``context`` (tokens, capped at the model's max) is the context of ``max_batch_at_context`` and
    of the decode bound; ``reserve_gib`` (GiB) is kept free for the CUDA context and activations.
    Sizes in the rows are bytes (``*_bytes``) or GiB (``*_gib``); the bound is ``decode_tok_s_bound``
    (None when the context does not fit at batch 1). The decode bound streams every weight except
    the input embedding table (a lookup reads one row; when tied, the table is the lm_head and is
    read).
    """
    if context < 1:
        raise ValueError(f"context must be >= 1 token, got {context}")
    if not (reserve_gib >= 0):
        raise ValueError(f"reserve must be >= 0 GiB, got {reserve_gib}")
    m = resolve_model(model)
    card_list = list(dict.fromkeys(resolve_card(c) for c in (cards or list(BUNDLED_CARDS))))
    variants = format_variants(formats, bits, group_size)
    kv = kv_bytes_per_token(m)
    n_params = parameter_count(m)
    n_linear = sum(o * i for _, o, i in decoder_linears(m)) * m.num_hidden_layers
    rows = []
    for card in card_list:
        for v in variants:
            w = weight_bytes(m, v)
            streamed = w["total"] - (0 if m.tie_word_embeddings else w["embed_tokens"])
            f = fit(w["total"], kv, card.memory_bytes, int(reserve_gib * GIB), m.max_position_embeddings, context)
            bound = (decode_bound(streamed, kv, f["context"], card.bandwidth_gbs)
                     if f["max_kv_tokens"] >= f["context"] else None)
            rows.append({
                "model": m.name, "card": card.name, "format": v.format, "bits": v.bits,
                "group_size": v.group_size, "label": v.label,
                "parameters": n_params, "weights_bytes": w["total"], "weights_gib": w["total"] / GIB,
                "linear_bits_per_weight": w["linears"] * 8 / n_linear,
                "kv_bytes_per_token": kv, "max_position_embeddings": m.max_position_embeddings,
                "card_memory_gib": card.memory_gib, "card_bandwidth_gbs": card.bandwidth_gbs,
                "card_source": "datasheet", "reserve_gib": reserve_gib,
                "free_gib": f["free_bytes"] / GIB, "fits": f["fits"], "max_kv_tokens": f["max_kv_tokens"],
                "max_context_batch1": f["max_context_batch1"], "context": f["context"],
                "max_batch_at_context": f["max_batch"], "decode_bytes_per_token": streamed + kv * f["context"],
                "decode_tok_s_bound": bound,
            })
    return rows


# ------------------------------------------------------------------------------------------ rendering
def _ctx_cell(r: dict) -> str:
    if not r["fits"]:
        return "does not fit"
    capped = r["max_context_batch1"] == r["max_position_embeddings"]
    return f"{r['max_context_batch1']}" + (" (max)" if capped else "")


def _bound_cell(r: dict) -> str:
    return "-" if r["decode_tok_s_bound"] is None else f"≤ {math.floor(r['decode_tok_s_bound'])}"


def _card_title(r: dict) -> str:
    return f"{r['card']} (datasheet: {r['card_memory_gib']:g} GiB, {r['card_bandwidth_gbs']:g} GB/s)"


def render_table(rows: list[dict]) -> str:
    """Markdown for :func:`plan_rows`' rows: per model a summary line and a table with one row
    per format. One card: a column per quantity; several: a column per card whose cells read
    ``max context at batch 1 / max batch at the context / decode tok/s bound``. Notes on what is
    assumed follow the tables."""
    if not rows:
        return "(no rows)\n"
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        r0 = mrows[0]
        ctx = r0["context"]
        cards = list(dict.fromkeys(r["card"] for r in mrows))
        labels = list(dict.fromkeys(r["label"] for r in mrows))
        cell = {(r["card"], r["label"]): r for r in mrows}
        out.append(f"**{model}**: {r0['parameters'] / 1e9:.2f} B parameters, KV cache "
                   f"{r0['kv_bytes_per_token'] / 1024:g} KiB per token (fp16), model max context "
                   f"{r0['max_position_embeddings']} tokens (a context marked (max) is capped by it, not by memory).\n")
        if len(cards) == 1:
            out.append(f"Card: {_card_title(r0)}.\n")
            out.append(f"| format | weights GiB | bits/weight (linears) | max context, batch 1 "
                       f"| max batch at {ctx} ctx | decode tok/s bound (batch 1, {ctx} ctx) |")
            out.append("|---|---:|---:|---:|---:|---:|")
            for label in labels:
                r = cell[(cards[0], label)]
                out.append(f"| {label} | {r['weights_gib']:.2f} | {r['linear_bits_per_weight']:.2f} "
                           f"| {_ctx_cell(r)} | {r['max_batch_at_context'] if r['fits'] else '-'} "
                           f"| {_bound_cell(r)} |")
        else:
            out.append(f"Each card cell: max context at batch 1 / max batch at {ctx} ctx / decode tok/s "
                       f"bound at batch 1 and {ctx} ctx.\n")
            titles = {c: _card_title(next(r for r in mrows if r["card"] == c)) for c in cards}
            out.append("| format | weights GiB | bits/weight (linears) | "
                       + " | ".join(titles[c] for c in cards) + " |")
            out.append("|---|---:|---:|" + "---:|" * len(cards))
            for label in labels:
                r = cell[(cards[0], label)]
                cells = []
                for c in cards:
                    rc = cell[(c, label)]
                    cells.append(_ctx_cell(rc) if not rc["fits"] else
                                 f"{_ctx_cell(rc)} / {rc['max_batch_at_context']} / {_bound_cell(rc)}")
                out.append(f"| {label} | {r['weights_gib']:.2f} | {r['linear_bits_per_weight']:.2f} | "
                           + " | ".join(cells) + " |")
        out.append("")
    r0 = rows[0]
    grouped = sorted({r["group_size"] for r in rows if r["group_size"]})
    out.append(
        "Computed, not measured. Card memory (GiB) and bandwidth (GB/s) are datasheet figures. Memory budget = card "
        f"memory - {r0['reserve_gib']:g} GiB reserve (CUDA context, activations) - weights; the rest holds "
        "the KV cache (fp16 K and V). Weights: every decoder linear (q/k/v/o, gate/up/down) in the "
        "format's packed tensors; embeddings, lm_head, norms and biases in fp16"
        + (f"; group size {', '.join(map(str, grouped))} where a format has groups" if grouped else "")
        + ". bits/weight: bytes of the decoder linears x 8 / their parameter count (codebooks, scales "
        "included). Decode tok/s bound = datasheet bandwidth / (weights read per token + KV cache of the "
        "context): an upper bound for batch 1, real decoding is slower.")
    return "\n".join(out) + "\n"

