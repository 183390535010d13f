"""SpinQuant (W4A4KV4) for Llama-family models: the offline rotations R1 (residual stream) and R2
(per attention head), fused into the weights (:mod:`.rotate`), and learned by Cayley SGD on the
Stiefel manifold (:mod:`.cayley`, :mod:`.train`). R3 and R4 are online Hadamards of the ``w4a4``
format. Implemented from docs/spec ``spinquant-spec.md`` sections 1, 2 and 4."""
