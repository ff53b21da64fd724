"""The one way a run's model is built from its configuration."""
from __future__ import annotations

import os
from typing import Any

import torch

from ..construction import init_experts_from_dense
from ..errors import ConfigError
from ..nn import SoMEForCausalLM
from .config import SoMEConfig

__all__ = ["build_model", "parameter_bytes"]


def parameter_bytes(config: SoMEConfig) -> int:
    """Bytes the model's tensors take (parameters, frozen experts when stored, key
    stores), from the configuration alone: checked before anything is allocated."""
    d, V, L, N, h = config.d_model, config.vocab_size, config.n_layers, config.num_experts, config.d_ffn
    router = d * d + d if config.router == "linear" else 2 * d * 2 * d + 3 * d
    per_layer = 4 * d * d + 4 * d + 4 * d + router + 3 * N * d  # attention, 2 LayerNorms, router, key store
    experts = N * (2 * h * d + h + d) if config.expert_storage == "materialized" else 0
    if config.ffn == "dense":  # attention, 2 LayerNorms, the dense FFN; no experts
        per_layer, experts = 4 * d * d + 4 * d + 4 * d + 2 * config.dense_width * d + config.dense_width + d, 0
    expert_size = 2 if config.expert_dtype == "bfloat16" else 4
    return 4 * (2 * V * d + 2 * d + L * per_layer) + expert_size * L * experts


def _memory_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, RuntimeError, AttributeError):  # not knowable here
        return None


def build_model(config: SoMEConfig, device: str | torch.device = "cpu", *,
                data=None) -> tuple[SoMEForCausalLM, dict[str, Any] | None]:
    """The SoME model of ``config`` on ``device``, and what expert construction did.

    With ``expert_init = "cluster"`` and the run's ``data`` given, the experts
    and keys are cut from a dense FFN (docs/method.md §7; :mod:`some.construction`) and
    the second value is its record (dense model results, cluster sizes); a
    model about to load a checkpoint passes no data, since the checkpoint holds
    its experts. Otherwise the second value is None.
    """
    device = torch.device(device)
    config = config.for_device(device)  # precision resolved: bf16 stores the frozen experts in bfloat16
    need, have = parameter_bytes(config), _memory_bytes(device)
    if have is not None and need > have:
        hint = " (expert_storage = procedural keeps no experts)" if config.expert_storage == "materialized" else ""
        raise ConfigError(f"the model needs {need / 2**30:,.1f} GiB for its tensors alone, more than the "
                          f"{have / 2**30:,.1f} GiB of {device}; reduce d_model, num_experts, d_ffn, n_layers or "
                          f"vocab_size{hint}")
    try:
        model = SoMEForCausalLM(config.model_config(), device=device)  # the architecture alone
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        raise ConfigError(f"not enough memory to build the model ({need / 2**30:,.1f} GiB of tensors on "
                          f"{device}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if config.expert_init == "cluster" and data is not None:
        return model, init_experts_from_dense(model, config, data, device)
    return model, None
