"""Floor 4: PYRA token modulation, a hook into floor 1's merge step (see :mod:`.modulator`).

    model = tocom.patch(timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=100))
    model.r = tocom.compress.parse_schedule("high", tocom.dims_of(model))   # or PYRA_SCHEDULES
    tocom.peft.add_lora(model, rank=8)
    add_pyra(model)                                  # W_r Gaussian, W_D = 0: identity until trained
    tocom.peft.mark_trainable(model, "lora", extra=[PARAM_PATTERN])   # W_r, W_D; LayerNorm frozen

``tocom finetune --method pyra --modulator-lr LR`` gives W_r and W_D their own peak lr
(:func:`tocom.jobs.finetune.run_finetune`).
"""

from tocom.compress.named import NAMED_SCHEDULES as PYRA_SCHEDULES
from tocom.compress.named import named_schedule
from tocom.pyra.modulator import (
    GAUSSIAN_STD,
    INITS,
    PARAM_PATTERN,
    PyraModulator,
    add_pyra,
    pyra_flops,
    pyra_parameters,
    pyra_schedule,
    remove_pyra,
)

__all__ = [
    "GAUSSIAN_STD", "INITS", "PARAM_PATTERN", "PYRA_SCHEDULES", "PyraModulator", "add_pyra",
    "named_schedule", "pyra_flops", "pyra_parameters", "pyra_schedule", "remove_pyra",
]
