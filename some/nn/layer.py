"""The SoME layer: a trainable router over a self-organizing key store that
picks, per token, ``k`` of ``N`` frozen experts (docs/method.md §2-§4).

Module -> op -> kernel: this file holds the module; the maths is in the ops of
``some.ops`` (C++/CUDA kernels in ``csrc/``).
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import TrainingDiverged
from ..ops import ExpertSpec, KeystoreStats
from ..ops.philox import GENERATOR, fill_expert_weights
from .config import SoMELayerConfig
from .revival import draw_candidates, revive_dead_keys
from .telemetry import RoutingTelemetry

__all__ = ["SoMELayer", "autocast_off"]


def autocast_off(device: torch.device):
    """A context that disables autocast on ``device`` where it is on."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # also for meta tensors, where autocast does not exist


def _uniform_(t: Tensor, bound: float, gen: torch.Generator | None) -> Tensor:
    return t.uniform_(-bound, bound, generator=gen)


class SoMELayer(nn.Module):
    """Router + key store + frozen experts (docs/method.md §2, §3), with the key-store
    self-organization of docs/method.md §4 applied by :meth:`update_keys`.

    Forward takes ``x`` of shape ``(B, S, d)`` (or ``(T, d)``) and an optional
    ``token_mask`` ``(B, S)`` of real (non-padding) tokens; padding tokens get
    no expert and output zero. In training mode each forward adds its
    key-store statistics to a pending sum that :meth:`update_keys` consumes
    (call it after every optimizer step).
    """

    def __init__(self, config: SoMELayerConfig, *, seed: int = 0, layer: int = 0, device=None, dtype=None,
                 expert_dtype: torch.dtype | None = None):
        super().__init__()
        config.validate()
        self.config = config
        d, N, h = config.d_model, config.num_experts, config.d_ffn
        factory = {"device": device, "dtype": dtype}

        # Router (trainable unless 'frozen'/'random'): d -> 2d -> d, or d -> d.
        if config.router == "linear":
            self.router = nn.Linear(d, d, **factory)
        else:
            self.router = nn.Sequential(nn.Linear(d, 2 * d, **factory), nn.GELU(), nn.Linear(2 * d, d, **factory))
        if config.router in ("frozen", "random"):
            self.router.requires_grad_(False)

        # Frozen experts (docs/method.md §9): a pure function of (seed, layer, expert,
        # tensor, index). Materialized storage keeps them as parameters that
        # never get a gradient (counted; saved only when they did not come from
        # the generator); procedural storage keeps nothing and the kernels
        # regenerate them where they are used.
        edt = expert_dtype or dtype or torch.get_default_dtype()
        self.expert_spec = ExpertSpec(int(seed), int(layer), N, d, h, edt)
        self.from_generator = config.expert_init == "default"  # False once experts are loaded from elsewhere
        self._digest: str | None = None  # of the generated experts, computed when first needed
        if config.expert_storage == "materialized":
            self.w1 = nn.Parameter(torch.empty(N, h, d, device=device, dtype=edt), requires_grad=False)
            self.b1 = nn.Parameter(torch.empty(N, h, device=device, dtype=edt), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(N, d, h, device=device, dtype=edt), requires_grad=False)
            self.b2 = nn.Parameter(torch.empty(N, d, device=device, dtype=edt), requires_grad=False)

        # Key store: buffers, float32 whatever the model dtype (it is updated by
        # small increments that bfloat16 would round away).
        kdt = torch.float64 if dtype == torch.float64 else torch.float32
        self.register_buffer("keys", torch.empty(N, d, device=device, dtype=kdt))
        self.register_buffer("key_velocity", torch.zeros(N, d, device=device, dtype=kdt))
        self.register_buffer("key_usage", torch.zeros(N, device=device, dtype=kdt))
        # Experts that routing may select (the adaptive process masks some out).
        self.register_buffer("expert_active", torch.ones(N, device=device, dtype=torch.bool))
        if config.gating == "top_any":
            self.thresholds = nn.Parameter(torch.zeros(N, device=device, dtype=kdt))
        else:
            self.thresholds = None

        # Adaptive process: this window's counts and unmatched queries (saved, so
        # a resumed run continues the window exactly).
        self.register_buffer("window_counts", torch.zeros(N, device=device, dtype=torch.long))
        self.register_buffer("window_unmatched", torch.zeros(d + 1, device=device, dtype=kdt))  # Σ q (raw), count
        self.register_buffer("window_steps", torch.zeros((), device=device, dtype=torch.long))

        # Validation-time usage counts (not saved): see track_usage().
        self.register_buffer("usage_counts", torch.zeros(N, device=device, dtype=torch.long), persistent=False)
        self.register_buffer("usage_tokens", torch.zeros((), device=device, dtype=torch.long), persistent=False)
        self.track_usage = False
        self._pending: KeystoreStats | None = None
        self._pending_unmatched: Tensor | None = None  # (d + 1,): Σ raw q of unmatched tokens, their count
        # revive_after > 0: queries of this step's routed tokens (N rows of [q̂, real]; all ranks' after the
        # data-parallel gather) from which dead keys are revived
        self._pending_candidates: Tensor | None = None
        # routing dynamics since the last report (some.analysis.dynamics reads them)
        self.telemetry = RoutingTelemetry(N, device=device, dtype=kdt)
        self.seed, self.layer = int(seed), int(layer)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Expert init ``default`` (each expert's two maps as ``nn.Linear``
        initializes them, drawn by the generator of :mod:`some.ops.philox`
        from ``(seed, layer)``) and random unit keys from ``seed + layer``."""
        if self.keys.device.type == "meta":
            return
        if self.materialized:
            fill_expert_weights(self.w1, self.b1, self.w2, self.b2, self.seed, self.layer)
            self.from_generator = True
        gen = torch.Generator(device=self.keys.device).manual_seed(self.seed + self.layer)
        keys = torch.randn(self.keys.shape, generator=gen, device=self.keys.device, dtype=self.keys.dtype)
        self.keys.copy_(keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.key_velocity.zero_()
        self.key_usage.zero_()
        self.expert_active.fill_(True)
        if self.config.initial_experts is not None:
            self.expert_active[self.config.initial_experts:] = False
        self.window_counts.zero_()
        self.window_unmatched.zero_()
        self.window_steps.zero_()
        self._router_gen = torch.Generator(device=self.keys.device).manual_seed(self.seed + self.layer + 1)

    # --------------------------------------------------------------- forward
    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        # The SoME layer runs outside autocast: cosine scores decide a top-k
        # (bf16 would turn near-ties into coin flips) and feed key-store sums
        # of small increments. Its experts compute in expert_dtype either way.
        with autocast_off(x.device):
            return self._forward(x, token_mask)

    def _forward(self, x: Tensor, token_mask: Tensor | None) -> Tensor:
        cfg = self.config
        shape = x.shape
        if x.dim() == 2:
            x = x.unsqueeze(0)
            token_mask = None if token_mask is None else token_mask.reshape(1, -1)
        if x.dim() != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"SoMELayer: expected x of shape (B, S, {cfg.d_model}) or (T, {cfg.d_model}), "
                             f"got {tuple(shape)}")
        if token_mask is not None and token_mask.shape != x.shape[:2]:
            raise ValueError(f"SoMELayer: token_mask shape {tuple(token_mask.shape)} must be {tuple(x.shape[:2])}")
        B, S, d = x.shape
        q = self.router(x)  # (B, S, d)
        if q.device.type == "cpu" and not bool(torch.isfinite(q).all()):  # (free on the CPU; a sync on GPUs)
            raise TrainingDiverged(f"the router's output is not finite (NaN/Inf) in SoME layer {self.layer}")

        route_kwargs = dict(score_mode=cfg.score_mode, top_p=cfg.top_p, thresholds=self.thresholds,
                            active=self.expert_active, fallback_top1=not self.training)
        if cfg.routing_level == "sequence":
            # One query per sequence (mean over its real tokens): all its tokens share experts.
            if token_mask is None:
                q_seq = q.mean(dim=1)
            else:
                m = token_mask.unsqueeze(-1).to(q.dtype)
                q_seq = (q * m).sum(1) / m.sum(1).clamp_min(1)
            r = ops.route(q_seq, self.keys, cfg.top_k, cfg.temperature, cfg.gating, **route_kwargs)
            indices = r.indices.unsqueeze(1).expand(B, S, -1).reshape(B * S, -1)
            gates = r.gates.unsqueeze(1).expand(B, S, -1).reshape(B * S, -1)
            q_tok = q_seq.unsqueeze(1).expand(B, S, d).reshape(B * S, d)
        else:
            q_tok = q.reshape(B * S, d)
            r = ops.route(q_tok, self.keys, cfg.top_k, cfg.temperature, cfg.gating, **route_kwargs)
            indices, gates = r.indices, r.gates
        if token_mask is not None:
            real = token_mask.reshape(-1, 1)
            indices = indices.masked_fill(~real, -1)
            gates = gates * real.to(gates.dtype)

        edt = self.expert_spec.dtype
        xe = x.reshape(B * S, d).to(edt)
        if self.materialized:
            y = ops.experts(xe, indices, gates.to(edt), self.w1, self.b1, self.w2, self.b2)
        else:
            y = ops.procedural_experts(xe, indices, gates.to(edt), self.expert_spec)

        if self.training:
            stats = ops.keystore_stats(q_tok.detach(), indices, gates.detach(), cfg.num_experts)
            self._pending = stats if self._pending is None else self._pending + stats
            scores = r.scores if cfg.routing_level == "token" else \
                r.scores.unsqueeze(1).expand(B, S, -1).reshape(B * S, -1)
            self.telemetry.observe_routing(indices, scores.detach())
            if cfg.revive_after and self._pending_candidates is None:  # the step's first micro-batch
                if cfg.routing_level == "sequence":
                    real = None if token_mask is None else token_mask.any(dim=1)
                    self._gather_candidates(q_seq.detach(), real)
                else:
                    self._gather_candidates(q_tok.detach(), None if token_mask is None else token_mask.reshape(-1))
            if cfg.adaptive:  # r was routed from q_seq (sequence level) or q_tok (token level)
                if cfg.routing_level == "sequence":
                    self._gather_unmatched(q_seq.detach(), r, None)
                else:
                    self._gather_unmatched(q_tok.detach(), r, token_mask)
        if self.track_usage:
            valid = indices[indices >= 0]
            self.usage_counts += torch.bincount(valid, minlength=cfg.num_experts)
            self.usage_tokens += int(token_mask.sum()) if token_mask is not None else B * S
        self.last_indices = indices.detach() if self.track_usage else None
        return y.to(x.dtype).reshape(shape)

    @torch.no_grad()
    def _gather_unmatched(self, q: Tensor, r: ops.RouteResult, token_mask: Tensor | None) -> None:
        """Add the raw router outputs of tokens that matched no expert well (DynMoE's
        ``sample_records`` sum the gate's raw inputs, not their directions)."""
        cfg = self.config
        if cfg.gating == "top_any":
            unmatched = (r.indices < 0).all(dim=1)
        else:
            unmatched = r.scores[:, 0].float() < cfg.adaptive_threshold
        if token_mask is not None:
            unmatched &= token_mask.reshape(-1)
        raw = q.to(self.window_unmatched.dtype)
        add = torch.cat([raw[unmatched].sum(0), unmatched.sum().to(raw.dtype).reshape(1)])
        self._pending_unmatched = add if self._pending_unmatched is None else self._pending_unmatched + add

    def _step_generator(self, salt: int) -> torch.Generator:
        """A generator seeded by (seed, layer, key update, salt): the draws of revival are a
        pure function of where the run is (so a resumed run and every rank draw the same)."""
        mixed = (self.seed * 0x9E3779B1 + self.layer * 0x85EBCA77 + self.telemetry.steps_taken * 0xC2B2AE3D
                 + salt) % 2**63
        return torch.Generator(device=self.keys.device).manual_seed(mixed)

    def _gather_candidates(self, q: Tensor, real: Tensor | None) -> None:
        self._pending_candidates = draw_candidates(q, real, self.config.num_experts, self._step_generator(0),
                                                   self.keys.dtype)

    def pending_candidates(self) -> Tensor | None:
        """This rank's revival candidates of the step, ``(N, d + 1)`` (zeros if it routed
        nothing); None when revival is off. Data-parallel training all-gathers them."""
        if not self.config.revive_after:
            return None
        if self._pending_candidates is None:
            self._pending_candidates = torch.zeros(self.config.num_experts, self.config.d_model + 1,
                                                   device=self.keys.device, dtype=self.keys.dtype)
        return self._pending_candidates

    def set_pending_candidates(self, candidates: Tensor) -> None:
        """The candidates of every rank (rows of all ranks in rank order)."""
        self._pending_candidates = candidates

    @torch.no_grad()
    def _adapt(self, counts: Tensor) -> None:
        """One step of the adaptive process's window (docs/method.md §7, DynMoE)."""
        cfg = self.config
        self.window_counts += counts
        if self._pending_unmatched is not None:
            self.window_unmatched += self._pending_unmatched
        self.window_steps += 1
        if int(self.window_steps) < cfg.adaptive_window:
            return
        # remove: experts unused during the whole window (DynMoE's remove_experts, no
        # floor: with a fixed-k gating every routed token uses k active experts anyway).
        # A window that routed no token at all (only padding) says nothing: keep all.
        d = cfg.d_model
        if int(self.window_counts.sum()) > 0 or self.window_unmatched[d] > 0:
            self.expert_active &= self.window_counts > 0
        # add: one expert keyed at the normalized sum of the unmatched tokens' raw
        # router outputs, in the lowest free slot, its threshold restarted at 0
        # (DynMoE's add_experts; the slot is usually one just removed for never firing)
        free = torch.nonzero(~self.expert_active).flatten()
        if self.window_unmatched[d] > 0 and free.numel() > 0:
            slot = int(free[0])
            key = self.window_unmatched[:d]
            self.keys[slot] = key / key.norm().clamp_min(1e-12)
            self.key_velocity[slot] = 0
            self.key_usage[slot] = 0
            if self.thresholds is not None:
                self.thresholds[slot] = 0
            self.expert_active[slot] = True
        self.window_counts.zero_()
        self.window_unmatched.zero_()
        self.window_steps.zero_()

    # ------------------------------------------------------- self-organization
    def pending_reducibles(self) -> list[Tensor]:
        """Every pending per-step sum that data-parallel ranks must all-reduce
        (in place) before :meth:`update_keys`: the key-store statistics and,
        with the adaptive process, the unmatched-query sum."""
        tensors = list(self.pending_stats(zeros_if_none=True))
        if self.config.adaptive:
            if self._pending_unmatched is None:
                self._pending_unmatched = torch.zeros_like(self.window_unmatched)
            tensors.append(self._pending_unmatched)
        return tensors

    def pending_stats(self, zeros_if_none: bool = False) -> KeystoreStats | None:
        """Key-store statistics gathered since the last update (None if none,
        or zeros that become the pending statistics with ``zeros_if_none``).
        Data-parallel training all-reduces these in place before update_keys()."""
        if self._pending is None and zeros_if_none:
            N, d = self.keys.shape
            dev = self.keys.device
            acc = torch.float64 if self.keys.dtype == torch.float64 else torch.float32
            self._pending = KeystoreStats(torch.zeros(N, d, dtype=acc, device=dev),
                                          torch.zeros(N, dtype=acc, device=dev),
                                          torch.zeros(N, dtype=torch.long, device=dev),
                                          torch.zeros(N, N, dtype=torch.long, device=dev))
        return self._pending

    @torch.no_grad()
    def update_keys(self, wait: bool | None = None) -> bool | Tensor | None:
        """Apply docs/method.md §4 with the statistics gathered since the last call.

        Returns True when the store was updated, False when the statistics (or
        the update) were not finite and the store was left untouched, None when
        there was nothing to apply. With ``wait=False`` (the default on GPUs) the
        verdict is a 0-dim bool tensor on the device, to be read when the caller
        synchronizes anyway.
        """
        cfg = self.config
        stats, self._pending = self._pending, None
        if cfg.router == "random":  # re-drawn every step
            for mod in self.router.modules():
                if isinstance(mod, nn.Linear):
                    bound = 1 / math.sqrt(mod.in_features)
                    _uniform_(mod.weight, bound, self._router_gen)
                    _uniform_(mod.bias, bound, self._router_gen)
        if stats is None:
            self._pending_candidates = None
            return None
        sum_q, mass, counts, coselect = stats
        keys_before = self.keys.clone()
        applied = ops.keystore_update(
            self.keys, self.key_velocity, self.key_usage, sum_q.to(self.keys.dtype), mass.to(self.keys.dtype),
            counts, coselect, cfg.alpha, cfg.beta, cfg.delta, cfg.theta_percentile, cfg.ema_decay,
            normalize=cfg.score_mode == "cosine", wait=self.keys.device.type == "cpu" if wait is None else wait,
        )
        self.telemetry.observe_update(counts, keys_before, self.keys)
        if cfg.revive_after and self._pending_candidates is not None:  # after the step's self-organization
            revive_dead_keys(self.keys, self.key_velocity, self.key_usage, self.expert_active, self.telemetry,
                             self._pending_candidates, cfg.revive_after, self._step_generator(1))
        self._pending_candidates = None
        if cfg.adaptive:  # after the step's self-organization, which used this step's experts
            self._adapt(counts)
        self._pending_unmatched = None
        return applied

    # ------------------------------------------------------------- experts
    @property
    def materialized(self) -> bool:
        return self.config.expert_storage == "materialized"

    @property
    def num_expert_parameters(self) -> int:
        """The frozen experts' weights, stored or not (docs/method.md §2 counts them)."""
        return self.expert_spec.parameters

    def __getattr__(self, name: str):
        if name in ("w1", "b1", "w2", "b2") and self.__dict__.get("config") is not None \
                and self.config.expert_storage == "procedural":
            raise AttributeError(f"SoMELayer.{name}: procedural expert storage holds no expert tensors; "
                                 f"call layer.materialize_experts() to get them")
        return super().__getattr__(name)

    @torch.no_grad()
    def materialize_experts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The experts as tensors ``(w1, b1, w2, b2)``: the stored ones, or for
        procedural storage freshly generated (N·h·d values: what that storage saves)."""
        if self.materialized:
            return self.w1, self.b1, self.w2, self.b2
        spec, dev = self.expert_spec, self.keys.device
        N, d, h, edt = spec.num_experts, spec.d_model, spec.d_ffn, spec.dtype
        w = (torch.empty(N, h, d, device=dev, dtype=edt), torch.empty(N, h, device=dev, dtype=edt),
             torch.empty(N, d, h, device=dev, dtype=edt), torch.empty(N, d, device=dev, dtype=edt))
        fill_expert_weights(*w, self.seed, self.layer)
        return w

    @torch.no_grad()
    def set_experts(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
        """Replace the stored experts (e.g. by experts cut from a dense FFN); from
        then on they are saved with the layer, since no generator makes them."""
        if not self.materialized:
            raise ValueError("SoMELayer.set_experts: procedural expert storage holds no expert tensors; "
                             "use expert_storage = 'materialized' for experts that do not come from the generator")
        for name, src in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            dst = getattr(self, name)
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"layer.{name} has shape {tuple(dst.shape)} but the new experts' {name} is "
                                 f"{tuple(src.shape)}")
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
        self.from_generator = False
        self._digest = None

    def experts_digest(self) -> str:
        """SHA-256 of the generated experts' bytes (materialized storage; computed once: they are frozen)."""
        if self._digest is None:
            h = hashlib.sha256()
            for t in (self.w1, self.b1, self.w2, self.b2):
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def get_extra_state(self) -> dict:
        # What makes the experts: checkpoints and exported models store this,
        # never experts the generator can make again.
        spec = self.expert_spec
        state = {"generator": GENERATOR, "storage": self.config.expert_storage, "seed": spec.seed,
                 "layer": spec.layer, "from_generator": self.from_generator}
        if self.materialized and self.from_generator and self.keys.device.type != "meta":
            state["digest"] = self.experts_digest()
        return state

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "generator" not in state:
            raise ValueError(f"SoMELayer: the saved expert record {state!r} is not one this version writes")
        if not state.get("from_generator", True):
            return  # the saved tensors are the experts (loaded with the parameters)
        spec = self.expert_spec
        if state["generator"] != GENERATOR:
            raise ValueError(f"SoMELayer: the experts were made by generator {state['generator']!r}; this version "
                             f"of some has {GENERATOR!r} and cannot regenerate them")
        if (state.get("seed"), state.get("layer")) != (spec.seed, spec.layer):
            raise ValueError(f"SoMELayer: the experts were generated with seed {state.get('seed')}, layer "
                             f"{state.get('layer')}; this layer has seed {spec.seed}, layer {spec.layer}")
        if self.materialized and "digest" in state and self.from_generator and state["digest"] != self.experts_digest():
            raise ValueError("SoMELayer: the regenerated experts differ from the saved run's (digest mismatch); "
                             "the generator or its inputs changed")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.from_generator:  # regenerable: the seed and generator in the extra state suffice
            for name in ("w1", "b1", "w2", "b2"):
                destination.pop(prefix + name, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expert_keys = [prefix + n for n in ("w1", "b1", "w2", "b2")]
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

    def router_rng_state(self) -> Tensor:
        """State of the generator that re-draws a ``random`` router (for exact resume)."""
        return self._router_gen.get_state()

    def set_router_rng_state(self, state: Tensor) -> None:
        self._router_gen.set_state(state)

    def reset_usage(self) -> None:
        self.usage_counts.zero_()
        self.usage_tokens.zero_()

    @property
    def experts_per_token(self) -> float:
        """Mean number of experts per (real) token since the last reset_usage()."""
        return float(self.usage_counts.sum()) / max(int(self.usage_tokens), 1)

    @property
    def active_experts(self) -> int:
        return int(self.expert_active.sum())

    def extra_repr(self) -> str:
        c = self.config
        return (f"d={c.d_model}, N={c.num_experts}, h={c.d_ffn}, k={c.top_k}, tau={c.temperature}, "
                f"gating={c.gating}, router={c.router}, level={c.routing_level}, experts={c.expert_storage}")
