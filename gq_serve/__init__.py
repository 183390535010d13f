"""gq-serve runtime: load quantized checkpoints, serve them, measure them.

Importing this package registers the ``guidedquant`` quant_method with transformers, so
``AutoModelForCausalLM.from_pretrained(ckpt)`` loads a gq checkpoint.
"""
from gq_serve import hf_quantizer  # noqa: F401  (registration side effect)
