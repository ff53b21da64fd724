"""The frozen experts of a SoME layer (docs/method.md §2, §9): stored or regenerated.

:class:`ExpertStore` owns the experts' weights and how they are kept:
``materialized`` storage holds them as parameters that never get a gradient,
``procedural`` storage holds none and the kernels regenerate them from
``(seed, layer)`` where they are used. Experts made by the generator are never
written to a checkpoint or exported model (the seed and the generator's name in
the extra state suffice, with a digest to catch a changed generator); experts
that came from elsewhere (cut from a dense FFN) are saved as tensors.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import ExpertSpec
from ..ops.philox import GENERATOR, fill_expert_weights

__all__ = ["EXPERT_TENSORS", "ExpertStore"]

EXPERT_TENSORS = ("w1", "b1", "w2", "b2")


def _shapes(spec: ExpertSpec) -> tuple[tuple[int, ...], ...]:
    """The shapes of ``(w1, b1, w2, b2)`` of ``spec``'s N experts."""
    N, d, h = spec.num_experts, spec.d_model, spec.d_ffn
    return (N, h, d), (N, h), (N, d, h), (N, d)


class ExpertStore(nn.Module):
    """``N`` experts ``W2_e GELU(W1_e x + b1_e) + b2_e`` of one layer; ``forward(x, indices, gates)``
    is ``Σ_j g_tj E_{I_tj}(x_t)`` (docs/method.md §3 step 5)."""

    def __init__(self, spec: ExpertSpec, storage: str, *, from_generator: bool = True, device=None):
        super().__init__()
        self.spec = spec
        self.storage = storage
        self.from_generator = from_generator  # False once experts come from elsewhere (a dense FFN, a file)
        self._digest: str | None = None  # of the generated experts, computed when first needed
        if self.materialized:
            for name, shape in zip(EXPERT_TENSORS, _shapes(spec)):
                self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=spec.dtype),
                                                           requires_grad=False))

    @property
    def materialized(self) -> bool:
        return self.storage == "materialized"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The generator's experts for ``(seed, layer)`` (stored storage; procedural has nothing to fill)."""
        if self.materialized and self.w1.device.type != "meta":
            fill_expert_weights(self.w1, self.b1, self.w2, self.b2, self.spec.seed, self.spec.layer)
            self.from_generator = True
            self._digest = None

    def forward(self, x: Tensor, indices: Tensor, gates: Tensor) -> Tensor:
        """``x`` ``(T, d)`` and ``gates`` ``(T, k)`` in the experts' dtype, ``indices`` ``(T, k)``."""
        if self.materialized:
            return ops.experts(x, indices, gates, self.w1, self.b1, self.w2, self.b2)
        return ops.procedural_experts(x, indices, gates, self.spec)

    def __getattr__(self, name: str):
        if name in EXPERT_TENSORS and self.__dict__.get("storage") == "procedural":
            raise AttributeError(f"SoMELayer.{name}: procedural expert storage holds no expert tensors; "
                                 f"call layer.materialize_experts() to get them")
        return super().__getattr__(name)

    @property
    def num_parameters(self) -> int:
        """The experts' weights, stored or not (docs/method.md §2 counts them)."""
        return self.spec.parameters

    @torch.no_grad()
    def materialize(self, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(w1, b1, w2, b2)``: the stored tensors, or for procedural storage freshly
        generated ones (N·h·d values: what that storage saves)."""
        if self.materialized:
            return self.w1, self.b1, self.w2, self.b2
        w = tuple(torch.empty(shape, device=device, dtype=self.spec.dtype) for shape in _shapes(self.spec))
        fill_expert_weights(*w, self.spec.seed, self.spec.layer)
        return w

    @torch.no_grad()
    def set_experts(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
        """Replace the stored experts; from then on they are saved, since no generator makes them."""
        if not self.materialized:
            raise ValueError("SoMELayer.set_experts: procedural expert storage holds no expert tensors; "
                             "use expert_storage = 'materialized' for experts that do not come from the generator")
        for name, src in zip(EXPERT_TENSORS, (w1, b1, w2, b2)):
            dst = getattr(self, name)
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"layer.{name} has shape {tuple(dst.shape)} but the new experts' {name} is "
                                 f"{tuple(src.shape)}")
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
        self.from_generator = False
        self._digest = None

    def digest(self) -> str:
        """SHA-256 of the stored experts' bytes (computed once: they are frozen)."""
        if self._digest is None:
            h = hashlib.sha256()
            for t in (self.w1, self.b1, self.w2, self.b2):
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    # ------------------------------------------------------------- saving
    def get_extra_state(self) -> dict:
        # What makes the experts: checkpoints and exported models store this,
        # never experts the generator can make again.
        spec = self.spec
        state = {"generator": GENERATOR, "storage": self.storage, "seed": spec.seed, "layer": spec.layer,
                 "from_generator": self.from_generator}
        if self.materialized and self.from_generator and self.w1.device.type != "meta":
            state["digest"] = self.digest()
        return state

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "generator" not in state:
            raise ValueError(f"SoMELayer: the saved expert record {state!r} is not one this version writes")
        if not state.get("from_generator", True):
            return  # the saved tensors are the experts (loaded with the parameters)
        spec = self.spec
        if state["generator"] != GENERATOR:
            raise ValueError(f"SoMELayer: the experts were made by generator {state['generator']!r}; this version "
                             f"of some has {GENERATOR!r} and cannot regenerate them")
        if (state.get("seed"), state.get("layer")) != (spec.seed, spec.layer):
            raise ValueError(f"SoMELayer: the experts were generated with seed {state.get('seed')}, layer "
                             f"{state.get('layer')}; this layer has seed {spec.seed}, layer {spec.layer}")
        if self.materialized and "digest" in state and self.from_generator and state["digest"] != self.digest():
            raise ValueError("SoMELayer: the regenerated experts differ from the saved run's (digest mismatch); "
                             "the generator or its inputs changed")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.from_generator:  # regenerable: the seed and generator in the extra state suffice
            for name in EXPERT_TENSORS:
                destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expert_keys = [prefix + n for n in EXPERT_TENSORS]
        carried = [k for k in expert_keys if k in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if carried and self.materialized:
            # the file carries the experts (constructed ones, or an older version's): they are the experts now
            self.from_generator = False
            self._digest = None
        elif self.from_generator:  # regenerated, not stored
            missing_keys[:] = [k for k in missing_keys if k not in expert_keys]
        if prefix + "_extra_state" not in state_dict:  # files of versions before the generator record
            missing_keys[:] = [k for k in missing_keys if k != prefix + "_extra_state"]
