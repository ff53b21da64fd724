"""The key store of a SoME layer (docs/method.md §3 steps 2-4, §4): keys that route, and
organize themselves after every optimizer step.

:class:`KeyStore` holds the keys, their velocities and usage EMA, which experts
routing may select, and the top-any thresholds. It routes queries through
``some.ops.route``, gathers the step's statistics from every training forward,
and :meth:`KeyStore.update` applies the rules (``some.ops.keystore_update``),
then dead-key revival and the adaptive process (DynMoE) when they are on.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import KeystoreStats
from ..ops.checks import stats_dtype
from .config import SoMELayerConfig
from .key_init import kmeans_keys
from .revival import draw_candidates, revive_dead_keys
from .router import Queries
from .telemetry import RoutingTelemetry, real_rows

__all__ = ["KeyStore"]


def _distributed() -> bool:
    """Whether a process group of more than one rank is running (the engine's data parallelism)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _broadcast_from_rank0(tensors: list[Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place, under data parallelism."""
    if _distributed():
        for t in tensors:
            torch.distributed.broadcast(t, src=0)


class KeyStore(nn.Module):
    def __init__(self, config: SoMELayerConfig, *, seed: int, layer: int, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.seed, self.layer = seed, layer
        N, d = config.num_experts, config.d_model
        # float32 whatever the model dtype (the keys move by small increments that
        # bfloat16 would round away); float64 in a float64 model
        kdt = stats_dtype(dtype) if dtype is not None else torch.float32
        self.register_buffer("keys", torch.empty(N, d, device=device, dtype=kdt))
        self.register_buffer("key_velocity", torch.zeros(N, d, device=device, dtype=kdt))
        self.register_buffer("key_usage", torch.zeros(N, device=device, dtype=kdt))
        # experts that routing may select (the adaptive process masks some out)
        self.register_buffer("expert_active", torch.ones(N, device=device, dtype=torch.bool))
        # top_any: the trainable per-expert thresholds G_e (the adaptive process resets them)
        self.thresholds = nn.Parameter(torch.zeros(N, device=device, dtype=kdt)) if config.gating == "top_any" \
            else None
        # adaptive process: this window's counts and unmatched tokens (saved: a resumed run
        # continues the window exactly)
        self.register_buffer("window_counts", torch.zeros(N, device=device, dtype=torch.long))
        self.register_buffer("window_unmatched", torch.zeros(d + 1, device=device, dtype=kdt))  # Σ raw q, count
        self.register_buffer("window_steps", torch.zeros((), device=device, dtype=torch.long))
        # this step's sums, until update() consumes them (data-parallel ranks all-reduce them first)
        self._pending: KeystoreStats | None = None
        self._pending_unmatched: Tensor | None = None  # (d + 1,): Σ raw q of unmatched tokens, their count
        # revive_after > 0: this step's revival candidates, N rows of [q̂, real] (all ranks' once gathered)
        self._pending_candidates: Tensor | None = None
        # center_queries: μ, the running mean of the routed rows, and how many updates set it
        # (registered only then: the state of a layer without it is unchanged); this step's
        # Σ rows and their count until update() consumes them
        if config.center_queries:
            self.register_buffer("query_mean", torch.zeros(d, device=device, dtype=kdt))
            self.register_buffer("query_mean_updates", torch.zeros((), device=device, dtype=torch.long))
        self._pending_query_sum: Tensor | None = None
        # balance_bias: the per-expert selection bias b (registered only then, as μ)
        if config.balance_bias:
            self.register_buffer("selection_bias", torch.zeros(N, device=device, dtype=kdt))
        # key_init = data: whether the keys were set from data yet (saved: a resumed run keeps them)
        if config.key_init == "data":
            self.register_buffer("keys_from_data", torch.zeros((), device=device, dtype=torch.bool))
        self._keys_from_data_seen = False  # keys_from_data read as True (loading a state reads it again)
        self._register_load_state_dict_pre_hook(self._forget_keys_from_data)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit keys from ``seed + layer``, all state at its start."""
        if self.keys.device.type == "meta":
            return
        # drawn on the CPU whatever the device: the same keys on every device
        gen = torch.Generator().manual_seed(self.seed + self.layer)
        keys = torch.randn(self.keys.shape, generator=gen, dtype=self.keys.dtype)
        self.keys.copy_(keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.key_velocity.zero_()
        self.key_usage.zero_()
        self.expert_active.fill_(True)
        if self.config.initial_experts is not None:
            self.expert_active[self.config.initial_experts:] = False
        self.window_counts.zero_()
        self.window_unmatched.zero_()
        self.window_steps.zero_()
        if self.config.center_queries:
            self.query_mean.zero_()
            self.query_mean_updates.zero_()
        if self.config.balance_bias:
            self.selection_bias.zero_()
        if self.config.key_init == "data":
            self.keys_from_data.fill_(False)
        self._keys_from_data_seen = False

    def _forget_keys_from_data(self, *args, **kwargs) -> None:
        self._keys_from_data_seen = False

    # --------------------------------------------------------------- routing
    @torch.no_grad()
    def init_keys_from_data(self, rows: Tensor, real: Tensor | None) -> None:
        """``key_init = data``: once, at the first training forward, the keys become k-means
        centroids of ``rows`` ``(R, d)`` (the router outputs; ``real`` marks the real ones),
        centered on their mean with center_queries (which then also starts μ there). With
        fewer real rows than experts, the remaining keys stay random. Under data parallelism
        rank 0's keys (and μ) are broadcast, so every rank starts from the same store."""
        cfg = self.config
        if cfg.key_init != "data" or self._keys_from_data_seen:
            return
        if bool(self.keys_from_data):  # (read once: a host sync on GPUs; set, it stays set)
            self._keys_from_data_seen = True
            return
        x = rows.detach().to(self.keys.dtype)
        if real is not None:
            x = x[real.reshape(-1)]
        computes = not _distributed() or torch.distributed.get_rank() == 0  # the others receive rank 0's
        if computes and x.shape[0] > 0:
            if cfg.center_queries:
                self.query_mean.copy_(x.mean(0))
                x = x - self.query_mean
            gen = torch.Generator().manual_seed(self.seed + self.layer)
            centroids = kmeans_keys(x, cfg.num_experts, gen, cosine=cfg.score_mode == "cosine")
            self.keys[:centroids.shape[0]] = centroids.to(self.keys.device, self.keys.dtype)
        _broadcast_from_rank0([self.keys, *([self.query_mean] if cfg.center_queries else [])])
        self.keys_from_data.fill_(True)
        self._keys_from_data_seen = True

    def center(self, rows: Tensor, real: Tensor | None, *, training: bool) -> Tensor:
        """``rows`` ``(R, d)`` minus μ with center_queries (as they are otherwise); in
        training, their real rows' sum joins the step's statistics for μ's update."""
        if not self.config.center_queries:
            return rows
        if training:
            with torch.no_grad():
                r, count = real_rows(rows, real, self.query_mean.dtype)
                add = torch.cat([r.sum(0), count.reshape(1)])
                self._pending_query_sum = add if self._pending_query_sum is None else self._pending_query_sum + add
        return rows - self.query_mean.to(rows.dtype)

    def route(self, query: Tensor, *, training: bool) -> ops.RouteResult:
        """Scores, selection and gates of ``query`` ``(R, d)`` against the active keys (§3 steps 2-4)."""
        cfg = self.config
        return ops.route(query, self.keys, cfg.top_k, cfg.temperature, cfg.gating, score_mode=cfg.score_mode,
                         top_p=cfg.top_p, thresholds=self.thresholds, active=self.expert_active,
                         fallback_top1=not training,
                         selection_bias=self.selection_bias if cfg.balance_bias else None)

    @torch.no_grad()
    def observe(self, queries: Queries, routed: ops.RouteResult, indices: Tensor, gates: Tensor,
                candidate_generator: Callable[[], torch.Generator]) -> None:
        """Add a training forward's statistics: per-token ``indices`` / ``gates`` ``(B·S, k)``
        (padding masked out) and, for revival and the adaptive process, the routed rows.
        ``candidate_generator()`` makes the generator of this step's revival candidates."""
        cfg = self.config
        stats = ops.keystore_stats(queries.per_token(queries.rows.detach()), indices, gates.detach(), cfg.num_experts,
                                   sparse_coselect=True)  # T·k·(k−1) pairs at most, not N × N
        self._pending = stats if self._pending is None else self._pending + stats
        if cfg.revive_after and self._pending_candidates is None:  # the step's first micro-batch
            self._pending_candidates = draw_candidates(queries.rows.detach(), queries.real, cfg.num_experts,
                                                       candidate_generator(), self.keys.dtype)
        if cfg.adaptive:
            self._gather_unmatched(queries.rows.detach(), routed, queries.real)

    def _gather_unmatched(self, q: Tensor, routed: ops.RouteResult, real: Tensor | None) -> None:
        """Add the raw router outputs of rows that matched no expert well (DynMoE's
        ``sample_records`` sum the gate's raw inputs, not their directions)."""
        cfg = self.config
        if cfg.gating == "top_any":
            unmatched = (routed.indices < 0).all(dim=1)
        else:
            # the best selected score (slot 0 holds it unless a selection bias chose the order)
            best = routed.scores.float().masked_fill(routed.indices < 0, float("-inf")).amax(dim=1)
            unmatched = best < cfg.adaptive_threshold
        if real is not None:
            unmatched &= real
        raw = q.to(self.window_unmatched.dtype)
        add = torch.cat([raw[unmatched].sum(0), unmatched.sum().to(raw.dtype).reshape(1)])
        self._pending_unmatched = add if self._pending_unmatched is None else self._pending_unmatched + add

    # ------------------------------------------------- data-parallel interface
    def pending_stats(self, zeros_if_none: bool = False) -> KeystoreStats | None:
        """Statistics gathered since the last update (None if none, or zeros that become the
        pending statistics with ``zeros_if_none``)."""
        if self._pending is None and zeros_if_none:
            N, d = self.keys.shape
            dev = self.keys.device
            acc = stats_dtype(self.keys.dtype)
            self._pending = KeystoreStats(torch.zeros(N, d, dtype=acc, device=dev),
                                          torch.zeros(N, dtype=acc, device=dev),
                                          torch.zeros(N, dtype=torch.long, device=dev),
                                          torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long, device=dev),
                                                                  torch.zeros(0, dtype=torch.long, device=dev),
                                                                  (N, N), check_invariants=False))
        return self._pending

    def pending_reducibles(self) -> list[Tensor]:
        """Every pending dense per-step sum that data-parallel ranks all-reduce (in place)
        before :meth:`update`: the statistics but the co-selection counts (compact:
        :meth:`pending_coselect`) and, with the adaptive process, the unmatched sum."""
        tensors = list(self.pending_stats(zeros_if_none=True))[:3]
        if self.config.adaptive:
            if self._pending_unmatched is None:
                self._pending_unmatched = torch.zeros_like(self.window_unmatched)
            tensors.append(self._pending_unmatched)
        if self.config.center_queries:
            if self._pending_query_sum is None:
                self._pending_query_sum = self.query_mean.new_zeros(self.config.d_model + 1)
            tensors.append(self._pending_query_sum)
        return tensors

    def pending_coselect(self) -> Tensor:
        """The pending co-selection counts (sparse COO), which data-parallel ranks sum by
        gathering their entries (:func:`some.engine.distributed.sparse_sum`)."""
        return self.pending_stats(zeros_if_none=True).coselect

    def set_pending_coselect(self, coselect: Tensor) -> None:
        self._pending = self.pending_stats(zeros_if_none=True)._replace(coselect=coselect)

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

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, telemetry: RoutingTelemetry, revival_generator: Callable[[], torch.Generator], *,
               wait: bool) -> bool | Tensor | None:
        """Apply the rules (§4) with the statistics gathered since the last call, then
        revival and the adaptive process. ``revival_generator()`` makes the generator of
        this step's revival draws. Returns the op's verdict, None when there was nothing."""
        cfg = self.config
        stats, self._pending = self._pending, None
        self._update_query_mean()
        if stats is None:
            self._pending_candidates = None
            return None
        sum_q, mass, counts, coselect = stats
        keys_before = self.keys.clone()
        applied = ops.keystore_update(
            self.keys, self.key_velocity, self.key_usage, sum_q.to(self.keys.dtype), mass.to(self.keys.dtype),
            counts, coselect, cfg.alpha, cfg.beta, cfg.delta, cfg.theta_percentile, cfg.ema_decay,
            normalize=cfg.score_mode == "cosine", wait=wait)
        telemetry.observe_update(counts, keys_before, self.keys)
        if cfg.balance_bias:
            self._balance(counts)
        if cfg.revive_after and self._pending_candidates is not None:  # after the step's self-organization
            revive_dead_keys(self.keys, self.key_velocity, self.key_usage, self.expert_active, telemetry,
                             self._pending_candidates, cfg.revive_after, revival_generator(),
                             self.selection_bias if cfg.balance_bias else None)
        self._pending_candidates = None
        if cfg.adaptive:  # after the step's self-organization, which used this step's experts
            self._adapt(counts)
        self._pending_unmatched = None
        return applied

    def _update_query_mean(self) -> None:
        """μ from this step's routed rows (center_queries): set by the first step that routed
        any, then moved by center_momentum towards each step's mean."""
        pending, self._pending_query_sum = self._pending_query_sum, None
        if pending is None or not self.config.center_queries or not float(pending[-1]) > 0:
            return
        mean = pending[:-1] / pending[-1]
        if int(self.query_mean_updates) == 0:
            self.query_mean.copy_(mean)
        else:
            self.query_mean.lerp_(mean, self.config.center_momentum)
        self.query_mean_updates += 1

    def _balance(self, counts: Tensor) -> None:
        """Loss-free balancing (DeepSeek-V3): b_e += u · sign(mean(c) − c_e) over the active
        experts, c this step's selection counts (the inactive ones keep their bias)."""
        active = self.expert_active
        c = counts.to(self.selection_bias.dtype)
        mean = (c * active).sum() / active.sum().clamp_min(1)  # (no host sync on GPUs)
        step = self.config.balance_rate * torch.sign(mean - c)
        self.selection_bias.add_(torch.where(active, step, 0.0))

    def _adapt(self, counts: Tensor) -> None:
        """One step of the adaptive process's window (docs/method.md §4, DynMoE)."""
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
            if cfg.balance_bias:  # (it grew while the slot was unused)
                self.selection_bias[slot] = 0
            self.expert_active[slot] = True
        self.window_counts.zero_()
        self.window_unmatched.zero_()
        self.window_steps.zero_()

    @property
    def active_experts(self) -> int:
        return int(self.expert_active.sum())
