"""The training loss of a model on its data as a twice-differentiable function of its own weights.

``core`` (the objective, its products and the derivative self-check), ``losses``, ``outputs``
(reading a model's structured output), ``safeops`` (second-order-safe rewrites), ``ties`` (tied
weights) and ``chain`` (the layer-chain engine for MLPs)."""
