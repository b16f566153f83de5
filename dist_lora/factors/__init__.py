"""Pure weight -> factor math for the inits that read the base weight: PiSSA / OLoRA
(``weight_driven``), CorDA's decomposition (``corda_math``), LoftQ's NF4 round trip
(``loftq``), and the checks they need of a base weight (``checks``).

Below :mod:`dist_lora.layers` (the LoRA layers call these on their weight shard); the
model-level drivers (EVA, CorDA's data pass, ``replace_lora_weights_loftq``) are in
:mod:`dist_lora.init`.
"""

from .corda_math import CordaEigens, corda_factors
from .loftq import loftq_factors
from .weight_driven import sharded_weight_driven_factors, weight_driven_factors

__all__ = [
    "CordaEigens",
    "corda_factors",
    "loftq_factors",
    "sharded_weight_driven_factors",
    "weight_driven_factors",
]
