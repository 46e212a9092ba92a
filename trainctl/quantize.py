"""QLoRA's 4-bit base: targeted ``nn.Linear`` layers replaced by bitsandbytes NF4/FP4 layers holding the
same weights, and back (dequantised) for merging adapters into full-precision weights."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from trainctl.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


def quantize_linears(model: "nn.Module", selected: Sequence[str], keep: Sequence[str], quant_type: str,
                     double_quant: bool, compute_dtype: "torch.dtype") -> int:
    """Replace the targeted ``nn.Linear`` layers by bitsandbytes 4-bit layers holding the same weights
    (quantised when the layer is placed on its device). Returns how many were replaced."""
    try:
        quiet_bitsandbytes()
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("peft", "peft=qlora needs bitsandbytes, which is not installed",
                          "pip install 'trainctl[qlora]'") from None
    from torch import nn

    device = next(model.parameters()).device
    replaced = 0
    for name in selected:
        if any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in keep):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if type(layer) is not nn.Linear:
            continue
        quant = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant_type,
                                  compress_statistics=double_quant)
        quant.weight = bnb.nn.Params4bit(layer.weight.data.float().cpu(), requires_grad=False,
                                         quant_type=quant_type, compress_statistics=double_quant)
        if layer.bias is not None:
            quant.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
        # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at the first no-grad forward in eval mode:
        # a different rounding at evaluation than in training, and it fails for widths not divisible by 32
        quant.support_avx512bf16_for_cpu = False
        setattr(parent, child, quant.to(device))
        replaced += 1
    if not replaced:
        raise ConfigError("peft.target_modules", "peft=qlora found no nn.Linear layer to quantise among the "
                          "targeted modules", f"target linear layers ({linear_examples(model)})")
    return replaced


def dequantize_linears(model: "nn.Module") -> int:
    """Replace every bitsandbytes 4-bit base layer by an ``nn.Linear`` holding its dequantised weights
    (inside adapter layers too), so adapters can be merged into full-precision weights."""
    from torch import nn

    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.data.float(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    return replaced


def quiet_bitsandbytes() -> None:
    """bitsandbytes logs a warning about optional CPU kernels at import; keep it off the console."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def linear_examples(model: "nn.Module") -> str:
    from torch import nn

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
