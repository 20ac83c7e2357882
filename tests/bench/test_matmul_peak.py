"""bench/matmul_peak.py --shapes: a model's own GEMMs against the square peak."""

from __future__ import annotations

import torch

from bench.matmul_peak import model_gemms, shape_efficiency, time_matmul


def test_model_gemms_are_vit_b16s_linears_at_the_batch() -> None:
    gemms = model_gemms("b16", batch=16)
    rows = 16 * 197  # 196 patches + the class token per image
    assert gemms == {"qkv": (rows, 768, 2304), "proj": (rows, 768, 768), "fc1": (rows, 768, 3072),
                     "fc2": (rows, 3072, 768)}  # fmt: skip


def test_shape_efficiency_weights_each_gemm_by_its_time() -> None:
    cpu = torch.device("cpu")
    peak = time_matmul("float32", 64, cpu, repeats=3, warmup=1)
    gemms = {"wide": (64, 32, 128), "tall": (128, 32, 64)}
    out = shape_efficiency("float32", peak, gemms, cpu, repeats=3)
    assert set(out) == {"wide", "tall", "block"} and all(value > 0 for value in out.values())
    # the block's speed is total ops over total time: a harmonic mean, between its GEMMs' speeds
    assert min(out["wide"], out["tall"]) <= out["block"] <= max(out["wide"], out["tall"])
    assert time_matmul("int8", 0, cpu, repeats=2, warmup=1, shape=(32, 16, 24)) > 0  # int8 takes (m, k, n) too
