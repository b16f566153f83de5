"""Dynamic loss scaling for an fp16 base (the scheme of apex / megatron / torch.amp's GradScaler).

fp16 keeps 5 exponent bits: small gradients underflow to zero. The loss is multiplied by a
scale S before backward (megatron's schedule calls ``config.grad_scale_func``), the gradients
(of the fp32 adapter masters) are divided by S before clipping and the optimizer step. A step
whose gradient norm is not finite overflowed: it is skipped and S halves; after
``growth_interval`` good steps in a row S doubles. S falling below ``minimum`` means the run
cannot be trained in fp16: an error, the last good checkpoint kept.
"""

from __future__ import annotations

import torch

from ..config import ConfigError


class DynamicLossScale:
    def __init__(self, initial: float = 2.0**16, minimum: float = 1.0, growth_interval: int = 1000) -> None:
        self.scale, self.minimum, self.growth_interval = float(initial), float(minimum), growth_interval
        self.good_steps = 0
        self.overflows = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What backward starts from (megatron's ``grad_scale_func``)."""
        return loss * self.scale

    def unscale_(self, params) -> None:
        """Divide the gradients of ``params`` by the scale, in place."""
        for p in params:
            if p.grad is not None:
                p.grad.mul_(1.0 / self.scale)

    def update(self, finite: bool) -> None:
        """After a step: back off on overflow (raising when the scale collapses), grow after a
        run of good steps."""
        if finite:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2.0
            return
        self.overflows += 1
        self.good_steps = 0
        self.scale /= 2.0
        if self.scale < self.minimum:
            raise ConfigError(
                f"the fp16 loss scale fell below its minimum ({self.minimum:g}) after {self.overflows} overflowing "
                "steps: the gradients overflow fp16 whatever the scale. Use model.dtype: bf16 (or fp32), or lower optim.lr."
            )
