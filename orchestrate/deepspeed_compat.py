"""One workaround for DeepSpeed 0.19.8, applied by the training loop before ``deepspeed.initialize``.

``DeepSpeedEngine._broadcast_model`` broadcasts every parameter as ``p.data.view(torch.uint8)``, which torch
refuses for 0-dim tensors ("self.dim() cannot be 0 to view Float as Byte"). X-SAM's phrase head has one: the
learnable ``logit_scale``. The patch gives such parameters a 1-element shape for the duration of the
broadcast only (same storage, so the broadcast still lands in the parameter), then restores their shape.
The rest of DeepSpeed (ZeRO flattening, checkpoints) handles 0-dim parameters.
"""

from __future__ import annotations

_PATCHED = False


def patch_deepspeed() -> None:
    """Idempotent; a no-op for DeepSpeed versions without ``_broadcast_model``."""
    global _PATCHED
    if _PATCHED:
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = getattr(DeepSpeedEngine, "_broadcast_model", None)
    if original is None:
        _PATCHED = True
        return

    def _broadcast_model(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            return original(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    DeepSpeedEngine._broadcast_model = _broadcast_model
    _PATCHED = True
