"""int8 through PyTorch 2 export quantisation (PT2E) with the X86 Inductor quantizer: a candidate for the served
int8, measured by bench/compile_modes.py (speed) and bench/int8_schemes.py (agreement), not served yet.

The served int8 (model/inference.quantise_int8: torchao, int8 weights per output channel, activations quantised per
token at run time) leaves a quarter of its time in inductor's own quantise / rescale kernels. PT2E hands inductor a
graph of quantise / dequantise pairs that its x86 passes fuse into oneDNN's int8 Linear with the rescale, bias and
next quantisation as post-ops: activations per tensor, either measured at run time (dynamic) or fixed from
calibration images (static, no reduction at all). Inductor's fusion passes need freezing (weights as constants).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def pt2e_int8(model: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor], dynamic: bool) -> nn.Module:
    """`model` (float32, eval) exported at `example`'s shape and quantised for x86 Inductor: per-channel int8
    weights, per-tensor int8 activations, dynamic or calibrated on `calibration`'s batches. Compile the result with
    torch._inductor.config.freezing on; eager, it runs the quantisation as reference arithmetic (slow)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(model, (example,)).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration:  # observers record each activation's range (dynamic: nothing to record)
            prepared(batch)
    return convert_pt2e(prepared)
