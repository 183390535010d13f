"""Calibration caches: gradient saliency + weight Fisher pass, Hessian pass, on-disk cache.

Public API (used by quantize.pipeline)::

    cache = CalibrationCache.open_or_build(cache_root, model, model_dir, windows, groups,
                                           need_guided, need_fisher, device="cpu", progress=True)
    cache.hessian(name, guided, groups)  # float32 [groups, in, in]; plain -> [1, in, in]
    cache.weight_fisher(name)            # float32 [out, in]
    cache.manifest                       # dict
    quantizable_linears(model)           # {"model.layers.0.self_attn.q_proj": nn.Linear, ...}
"""
from .cache import CalibrationCache, CalibrationCacheError, model_hash
from .hessians import coarsen_groups, guided_update, plain_update
from .saliency import GRAD_SCALE, group_saliency, quantizable_linears

__all__ = [
    "CalibrationCache",
    "CalibrationCacheError",
    "GRAD_SCALE",
    "coarsen_groups",
    "group_saliency",
    "guided_update",
    "model_hash",
    "plain_update",
    "quantizable_linears",
]
