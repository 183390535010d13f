"""How much memory each pass of `gq quantize` needs, computed from the model's shape (nothing run).

Every figure is an estimate from the config: parameter counts are exact, activations are counted
tensor by tensor for a Llama-style layer (below), allocator slack and the framework's own memory
are not included. Compute dtype: float32 (4 bytes), as the calibration passes run.

Per pass and mode, two numbers: ``device`` (the accelerator; on a CPU-only run it is the same
process memory) and ``host`` (CPU memory besides the device, for what is parked there: layer
inputs, saliency rows).

Activations one window leaves for autograd in one decoder layer, per token (floats), with a query
heads, k key/value heads of size d, hidden h, intermediate i, window T:
    norms 4h, q/k/v outputs and their rotated copies 3ad + 3kd, k/v expanded to a heads 2ad,
    attention weights aT (eager / math attention materializes them), attention output and
    o_proj input 2ad, MLP gate, up, activation and product 4i
  = 4h + 7ad + 3kd + 4i + aT.
"""
from __future__ import annotations

from dataclasses import dataclass

from gq_serve.plan import ModelConfig, decoder_linears, dense_parts, resolve_model

FP32 = 4
GIB = 1 << 30
MIB = 1 << 20

# Shapes of public configs gq plan does not bundle (Hugging Face hub config.json values).
LARGE_MODELS = {m.name.lower(): m for m in (
    ModelConfig("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000, False, 4096),
    ModelConfig("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, False, 8192),
)}


def model_shape(spec: str) -> ModelConfig:
    """A model directory / config.json path, a `gq plan` bundled name, or Llama-2-70B / Llama-3-70B."""
    if spec.lower() in LARGE_MODELS:
        return LARGE_MODELS[spec.lower()]
    return resolve_model(spec)


@dataclass(frozen=True)
class Settings:
    """What of a quantization run decides its memory."""

    n_samples: int
    seq_len: int
    groups: int = 1  # guided Hessians per linear (1: plain only)
    guided: bool = False
    fisher: bool = False  # SqueezeLLM / LNQ's initialisation need the weight Fisher
    chunk_windows: int = 16  # windows per gradient-pass chunk (cache.DEFAULT_CHUNK_WINDOWS)
    offload: bool = False  # --offload-dir: layer inputs of the streamed gradient pass on disk
    sequential: bool = False  # --sequential: Hessians made while quantizing, a layer resident


def layer_params(m: ModelConfig) -> int:
    """Parameters of one decoder layer: its linears, two norms, biases."""
    biases = dense_parts(m)["biases"] // m.num_hidden_layers
    return sum(o * i for _, o, i in decoder_linears(m)) + 2 * m.hidden_size + biases


def head_params(m: ModelConfig) -> int:
    """Parameters outside the decoder layers: embeddings, LM head (0 if tied), final norm."""
    parts = dense_parts(m)
    return parts["embed_tokens"] + parts["lm_head"] + m.hidden_size


def activation_floats_per_token(m: ModelConfig, seq_len: int) -> int:
    """What one window leaves for autograd in one layer, per token (module docstring)."""
    h, i, d = m.hidden_size, m.intermediate_size, m.head_size
    a, k = m.num_attention_heads, m.num_key_value_heads
    return 4 * h + 7 * a * d + 3 * k * d + 4 * i + a * seq_len


def hessian_bytes(m: ModelConfig, s: Settings, stagewise: bool = False) -> int:
    """Hessian accumulators held at once: plain (one per distinct input) and, if guided, g per linear;
    for the whole layer, or (stagewise, as the streamed pass does) for its largest group of linears
    sharing an input (q/k/v, o, gate/up, down)."""
    h, o_in, down_in = m.hidden_size, decoder_linears(m)[3][2], decoder_linears(m)[6][2]
    g = s.groups if s.guided else 0
    stages = [(h, 3), (o_in, 1), (h, 2), (down_in, 1)]  # (input size, linears fed by it)
    per_stage = [i * i * (1 + g * k) for i, k in stages]
    return (max(per_stage) if stagewise else sum(per_stage)) * FP32


def needs(m: ModelConfig, s: Settings) -> dict[str, dict[str, dict[str, int]]]:
    """Bytes per pass ("gradients", "hessians", "quantize") and mode ("in_memory", "streamed"):
    {"device": ..., "host": ...}. The gradient pass exists only for guided or Fisher runs."""
    T, h, L = s.seq_len, m.hidden_size, m.num_hidden_layers
    chunk = min(s.n_samples, s.chunk_windows)
    all_params = (layer_params(m) * L + head_params(m)) * FP32
    layer, head = layer_params(m) * FP32, head_params(m) * FP32
    lin_layer = sum(o * i for _, o, i in decoder_linears(m)) * FP32
    acts_layer = activation_floats_per_token(m, T) * T * FP32  # one window, one layer
    logits = 3 * T * m.vocab_size * FP32  # logits, their fp32 log-softmax, its gradient
    hidden = T * h * FP32  # one window's hidden states
    saliency_rows = L * 7 * s.n_samples * T * max(s.groups, 1) * FP32

    out: dict[str, dict[str, dict[str, int]]] = {}
    if s.guided or s.fisher:
        fisher_mem = 2 * lin_layer * L if s.fisher else 0  # dL/dW of one window + the running sum
        fisher_layer = 2 * lin_layer if s.fisher else 0
        kept = chunk * hidden * (2 if s.offload else L)  # layer inputs: one layer at a time, or all
        out["gradients"] = {
            "in_memory": {"device": all_params + fisher_mem + L * acts_layer + logits, "host": saliency_rows},
            "streamed": {"device": max(layer + fisher_layer + acts_layer + 2 * hidden, head + logits + hidden),
                         "host": kept + chunk * hidden + saliency_rows,
                         "disk": chunk * hidden * L if s.offload else 0},
        }
    layer_io = 2 * s.n_samples * hidden  # one layer's inputs and outputs for every window, on the host
    # The finished layer's Hessians wait on the host until its file is written (once: safetensors
    # writes from the tensors, and the pass drops them before the next layer starts).
    saving = hessian_bytes(m, s)
    out["hessians"] = {
        "in_memory": {"device": all_params + hessian_bytes(m, s) + 4 * hidden, "host": layer_io + saving},
        "streamed": {"device": max(layer + hessian_bytes(m, s, stagewise=True) + 4 * hidden, head),
                     "host": layer_io + saving},
    }
    biggest = max(decoder_linears(m), key=lambda x: x[1] * x[2] + max(s.groups, 1) * x[2] ** 2)
    _, o, i = biggest
    # W and W_hat, its g Hessians and the solver's in x in workspace (inverse / Cholesky factor).
    one_linear = (2 * o * i + (max(s.groups, 1) + 2) * i * i) * FP32
    # Sequential: the layer runs to make its Hessians (at most one layer's worth at once) while
    # quantizing; otherwise the streamed run reads one linear's weight at a time.
    seq = hessian_bytes(m, s, stagewise=True) + 4 * hidden if s.sequential else 0
    out["quantize"] = {
        "in_memory": {"device": all_params + seq + one_linear, "host": layer_io if s.sequential else 0},
        "streamed": {"device": (layer if s.sequential else 0) + seq + one_linear,
                     "host": layer_io if s.sequential else 0},
    }
    return out


def peak(plan: dict, mode: str) -> int:
    """The largest device need of any pass in ``mode``."""
    return max(p[mode]["device"] for p in plan.values())


def choose_mode(plan: dict, budget_bytes: int | None) -> str:
    """"in_memory" when it fits ``budget_bytes`` (or no budget is given), else "streamed" if that
    fits; raises ValueError naming the need and the ways out when neither does."""
    if budget_bytes is None or peak(plan, "in_memory") <= budget_bytes:
        return "in_memory"
    if peak(plan, "streamed") <= budget_bytes:
        return "streamed"
    worst = max(plan, key=lambda p: plan[p]["streamed"]["device"])
    raise ValueError(
        f"even streamed, the {worst} pass needs {plan[worst]['streamed']['device'] / GIB:.1f} GiB of device memory, "
        f"more than --max-device-memory {budget_bytes / GIB:.1f} GiB; the Hessians grow with --groups "
        f"(g x in^2 per linear), the activations with --seq-len: lower them, or use a larger device")


def render(name: str, plan: dict, s: Settings, budget_bytes: int | None = None) -> str:
    """The dry-run table: GiB per pass and mode, and which mode the budget picks."""
    lines = [f"memory needs of {name} (computed from its config, fp32; n={s.n_samples} x {s.seq_len} tokens, "
             f"g={s.groups if s.guided else 1}{', Fisher' if s.fisher else ''}"
             f"{', layer inputs offloaded' if s.offload else ''})",
             f"{'pass':<10} {'in-memory device':>17} {'host':>8} {'streamed device':>16} {'host':>8}"]
    for p, modes in plan.items():
        a, b = modes["in_memory"], modes["streamed"]
        lines.append(f"{p:<10} {a['device'] / GIB:>13.2f} GiB {a['host'] / GIB:>8.2f} "
                     f"{b['device'] / GIB:>12.2f} GiB {b['host'] / GIB:>8.2f}")
    lines.append(f"{'peak':<10} {peak(plan, 'in_memory') / GIB:>13.2f} GiB {'':>8} "
                 f"{peak(plan, 'streamed') / GIB:>12.2f} GiB")
    if s.offload and "gradients" in plan:
        lines.append(f"offload dir: up to {plan['gradients']['streamed']['disk'] / GIB:.2f} GiB of disk "
                     f"(every layer's inputs for {min(s.n_samples, s.chunk_windows)} windows)")
    if budget_bytes is not None:
        try:
            mode = choose_mode(plan, budget_bytes)
            lines.append(f"with --max-device-memory {budget_bytes / GIB:.1f} GiB: {mode.replace('_', '-')}")
        except ValueError as e:
            lines.append(f"with --max-device-memory {budget_bytes / GIB:.1f} GiB: does not fit ({e})")
    return "\n".join(lines)
