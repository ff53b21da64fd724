"""The SoME layer (docs/method.md §2-§4): a trainable router over a self-organizing key
store that picks, per token, ``k`` of ``N`` frozen experts.

Module -> op -> kernel: the layer composes three parts with one job each —
:class:`~some.nn.router.Router` (queries), :class:`~some.nn.keystore.KeyStore`
(routing against the keys and their self-organization) and
:class:`~some.nn.experts.ExpertStore` (the frozen experts) — with
:class:`~some.nn.telemetry.RoutingTelemetry` and a
:class:`~some.nn.telemetry.UsageRecorder` beside them. The maths is in the ops
of ``some.ops`` (C++/CUDA kernels in ``csrc/``).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..errors import TrainingDiverged
from ..ops import ExpertSpec
from .config import SoMELayerConfig
from .experts import EXPERT_TENSORS, ExpertStore
from .keystore import KeyStore
from .router import Router
from .telemetry import RoutingTelemetry, UsageRecorder

__all__ = ["SoMELayer", "autocast_off"]

# state-dict names of the layer before it was split into parts -> their names now
_KEY_STORE_STATE = ("keys", "key_velocity", "key_usage", "expert_active", "thresholds", "window_counts",
                    "window_unmatched", "window_steps")
_MOVED = {**{n: f"key_store.{n}" for n in _KEY_STORE_STATE},
          **{n: f"experts.{n}" for n in (*EXPERT_TENSORS, "_extra_state")}}


def autocast_off(device: torch.device):
    """A context that disables autocast on ``device`` where it is on."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # also for meta tensors, where autocast does not exist


class SoMELayer(nn.Module):
    """Router + key store + frozen experts. ``forward`` takes ``x`` ``(B, S, d)`` (or
    ``(T, d)``) and an optional ``token_mask`` ``(B, S)`` of real tokens; padding gets no
    expert and outputs zero. In training mode each forward adds its key-store statistics
    to a pending sum that :meth:`update_keys` consumes (call it after every optimizer step).
    """

    def __init__(self, config: SoMELayerConfig, *, seed: int = 0, layer: int = 0, device=None, dtype=None,
                 expert_dtype: torch.dtype | None = None):
        super().__init__()
        config.validate()
        self.config = config
        seed, layer = int(seed), int(layer)
        N, d, h = config.num_experts, config.d_model, config.d_ffn
        router = Router(config, seed=seed, layer=layer, device=device, dtype=dtype)  # draws from the RNG
        # Registered key store first: an optimizer's state follows the order of the trainable
        # parameters, which was (thresholds, router) before the layer had parts.
        self.key_store = KeyStore(config, seed=seed, layer=layer, device=device, dtype=dtype)
        self.router = router
        spec = ExpertSpec(seed, layer, N, d, h, expert_dtype or dtype or torch.get_default_dtype())
        self.experts = ExpertStore(spec, config.expert_storage, from_generator=config.expert_init == "default",
                                   device=device)
        self.telemetry = RoutingTelemetry(N, config.d_model, device=device, dtype=self.key_store.keys.dtype)
        self.usage = UsageRecorder(N, device=device)
        self._register_load_state_dict_pre_hook(self._rename_old_state)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The generator's experts for ``(seed, layer)``, random unit keys from ``seed + layer``."""
        self.experts.reset_parameters()
        self.key_store.reset_parameters()
        self.router.reset_generator()

    # --------------------------------------------------------------- forward
    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        # The SoME layer runs outside autocast: cosine scores decide a top-k
        # (bf16 would turn near-ties into coin flips) and feed key-store sums
        # of small increments. Its experts compute in their own dtype either way.
        with autocast_off(x.device):
            return self._forward(x, token_mask)

    def _forward(self, x: Tensor, token_mask: Tensor | None) -> Tensor:
        shape, d = x.shape, self.config.d_model
        if x.dim() == 2:
            x = x.unsqueeze(0)
            token_mask = None if token_mask is None else token_mask.reshape(1, -1)
        if x.dim() != 3 or x.shape[-1] != d:
            raise ValueError(f"SoMELayer: expected x of shape (B, S, {d}) or (T, {d}), got {tuple(shape)}")
        if token_mask is not None and token_mask.shape != x.shape[:2]:
            raise ValueError(f"SoMELayer: token_mask shape {tuple(token_mask.shape)} must be {tuple(x.shape[:2])}")
        B, S, _ = x.shape

        queries = self.router(x, token_mask)  # step 1
        if self.training:  # key_init = data: the keys from this first batch's queries (once)
            self.key_store.init_keys_from_data(queries.rows, queries.real)
        queries = replace(queries, rows=self.key_store.center(queries.rows, queries.real, training=self.training))
        if queries.rows.device.type == "cpu" and not bool(torch.isfinite(queries.rows).all()):  # (a sync on GPUs)
            raise TrainingDiverged(f"the router's output is not finite (NaN/Inf) in SoME layer {self.layer}")
        routed = self.key_store.route(queries.rows, training=self.training)  # steps 2-4
        indices, gates = queries.per_token(routed.indices), queries.per_token(routed.gates)
        if token_mask is not None:
            real = token_mask.reshape(-1, 1)
            indices = indices.masked_fill(~real, -1)
            gates = gates * real.to(gates.dtype)
        edt = self.experts.spec.dtype
        y = self.experts(x.reshape(B * S, d).to(edt), indices, gates.to(edt))  # step 5

        if self.training:
            self.key_store.observe(queries, routed, indices, gates, lambda: self._step_generator(0))
            self.telemetry.observe_routing(indices, queries.per_token(routed.scores).detach())
            self.telemetry.observe_shared(x.reshape(B * S, d), token_mask, queries.rows, queries.real)
        self.usage.observe(indices, token_mask)
        return y.to(x.dtype).reshape(shape)

    # ------------------------------------------------------- self-organization
    def _step_generator(self, salt: int) -> torch.Generator:
        """A generator seeded by (seed, layer, key update, salt): the draws of revival are a
        pure function of where the run is (so a resumed run and every rank draw the same)."""
        mixed = (self.seed * 0x9E3779B1 + self.layer * 0x85EBCA77 + self.telemetry.steps_taken * 0xC2B2AE3D
                 + salt) % 2**63
        return torch.Generator(device=self.key_store.keys.device).manual_seed(mixed)

    @torch.no_grad()
    def update_keys(self, wait: bool | None = None) -> bool | Tensor | None:
        """Self-organize the key store with the statistics gathered since the last call
        (docs/method.md §4). True when the store was updated, False when the statistics (or
        the update) were not finite and the store was left untouched, None when there was
        nothing to apply. With ``wait=False`` (the default on GPUs) the verdict is a 0-dim
        bool tensor on the device, to be read when the caller synchronizes anyway."""
        self.router.redraw()  # a 'random' router: new weights every step
        wait = self.key_store.keys.device.type == "cpu" if wait is None else wait
        return self.key_store.update(self.telemetry, lambda: self._step_generator(1), wait=wait)

    # the data-parallel interface (some.engine.distributed) and the key store's state
    def pending_reducibles(self) -> list[Tensor]:
        return self.key_store.pending_reducibles()

    def pending_stats(self, zeros_if_none: bool = False):
        return self.key_store.pending_stats(zeros_if_none)

    def pending_coselect(self) -> Tensor:
        return self.key_store.pending_coselect()

    def set_pending_coselect(self, coselect: Tensor) -> None:
        self.key_store.set_pending_coselect(coselect)

    def pending_candidates(self) -> Tensor | None:
        return self.key_store.pending_candidates()

    def set_pending_candidates(self, candidates: Tensor) -> None:
        self.key_store.set_pending_candidates(candidates)

    keys = property(lambda self: self.key_store.keys)
    key_velocity = property(lambda self: self.key_store.key_velocity)
    key_usage = property(lambda self: self.key_store.key_usage)
    expert_active = property(lambda self: self.key_store.expert_active)
    thresholds = property(lambda self: self.key_store.thresholds)
    active_experts = property(lambda self: self.key_store.active_experts)

    def router_rng_state(self) -> Tensor:
        return self.router.rng_state()

    def set_router_rng_state(self, state: Tensor) -> None:
        self.router.set_rng_state(state)

    # ------------------------------------------------------------- experts
    @property
    def expert_spec(self) -> ExpertSpec:
        return self.experts.spec

    seed = property(lambda self: self.experts.spec.seed)  # the model's seed: experts, keys, draws
    layer = property(lambda self: self.experts.spec.layer)  # this layer's index in the model

    @property
    def materialized(self) -> bool:
        return self.experts.materialized

    @property
    def num_expert_parameters(self) -> int:
        return self.experts.num_parameters

    def __getattr__(self, name: str):
        if name in EXPERT_TENSORS and "experts" in self.__dict__.get("_modules", {}):
            return getattr(self._modules["experts"], name)  # the stored tensors (procedural storage: an error)
        return super().__getattr__(name)

    def materialize_experts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The experts as tensors ``(w1, b1, w2, b2)`` (procedural storage: freshly generated)."""
        return self.experts.materialize(self.key_store.keys.device)

    def set_experts(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
        """Replace the stored experts (e.g. by experts cut from a dense FFN)."""
        self.experts.set_experts(w1, b1, w2, b2)

    # ---------------------------------------------------------- old files
    @staticmethod
    def _rename_old_state(state_dict, prefix, *_):
        """Files written before the layer was split into parts: their names, mapped."""
        for old, new in _MOVED.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        router = prefix + "router."
        for key in [k for k in state_dict if k.startswith(router) and not k.startswith(router + "net.")]:
            state_dict[router + "net." + key[len(router):]] = state_dict.pop(key)

    def extra_repr(self) -> str:
        c = self.config
        return (f"d={c.d_model}, N={c.num_experts}, h={c.d_ffn}, k={c.top_k}, tau={c.temperature}, "
                f"gating={c.gating}, router={c.router}, level={c.routing_level}, experts={c.expert_storage}")
