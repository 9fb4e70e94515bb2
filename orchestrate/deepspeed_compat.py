"""Two adjustments to DeepSpeed 0.19.8, applied by the training loop before ``deepspeed.initialize``.

1. No shared-memory comm op on CPU. DeepSpeed's torch backend JIT-builds ``deepspeed_shm_comm`` at start
(about 30 s once per machine) although only tensor-parallel *inference* uses it (``inference_all_reduce``);
ZeRO training talks through ``torch.distributed``. Worse, the build holds a lock file in
``TORCH_EXTENSIONS_DIR``: a worker killed while holding it (a SIGKILLed worker, ``ray stop``) leaves the lock
behind and every later worker waits on it forever. Without the op, ``inference_all_reduce`` falls back to
``torch.distributed.all_reduce``.

2. ``DeepSpeedEngine._broadcast_model`` broadcasts every parameter as ``p.data.view(torch.uint8)``, which
   torch
refuses for 0-dim tensors ("self.dim() cannot be 0 to view Float as Byte"). X-SAM's phrase head has one: the
learnable ``logit_scale``. The patch gives such parameters a 1-element shape for the duration of the
broadcast only (same storage, so the broadcast still lands in the parameter), then restores their shape.
The rest of DeepSpeed (ZeRO flattening, checkpoints) handles 0-dim parameters.
"""

from __future__ import annotations

import importlib

# Heavy imports (deepspeed) are deferred into the patch: importing DeepSpeed costs seconds.

_PATCHED = False


def patch_deepspeed() -> None:
    """Idempotent; each part is skipped where this DeepSpeed lacks what it patches."""
    global _PATCHED
    if _PATCHED:
        return

    from deepspeed.runtime.engine import DeepSpeedEngine

    # the module itself: `import deepspeed.comm.torch as m` would bind the `torch` package that
    # deepspeed.comm re-exports under that name
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

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
