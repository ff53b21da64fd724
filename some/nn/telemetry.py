"""What a SoME layer's routing and key store did since the last report (docs/method.md §10).

:class:`RoutingTelemetry` is a submodule of every :class:`~some.nn.SoMELayer`
that accumulates, on the device and without host synchronization, sums the
routing and the key-store update produce anyway: selections per expert,
top-1 and selected scores, key movement, when each expert was last selected.
:func:`some.analysis.dynamics.dynamics_records` turns them into the records of
``dynamics.jsonl`` at each logging interval. The buffers are saved with the
model, so a resumed run continues its window exactly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["RoutingTelemetry", "UsageRecorder", "real_rows"]


def real_rows(t: Tensor, real: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``t`` ``(R, d)`` detached in ``dtype`` with its padding rows zeroed, and how many rows are
    real (``real`` ``(R,)`` or any shape of R elements; None: all): what row sums over real
    tokens start from."""
    t = t.detach().to(dtype)
    if real is None:
        return t, t.new_tensor(float(t.shape[0]))
    return t * real.reshape(-1, 1).to(dtype), real.sum().to(dtype)


class RoutingTelemetry(nn.Module):
    """Window sums of one layer's routing dynamics (reset at each report)."""

    # buffers added after runs were saved: a checkpoint without them starts them at zero
    LATER_BUFFERS = ("shared_sums", "shared_norms")

    def __init__(self, num_experts: int, d_model: int = 0, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        N = num_experts
        # the current window
        self.register_buffer("counts", torch.zeros(N, device=device, dtype=torch.long))  # selections per expert
        # Σ top-1 score, Σ selected scores, selected slots, routed tokens
        self.register_buffer("scores", torch.zeros(4, device=device, dtype=dtype))
        self.register_buffer("move", torch.zeros(2, device=device, dtype=dtype))  # Σ mean ‖ΔK‖, max ‖ΔK‖
        self.register_buffer("updates", torch.zeros((), device=device, dtype=torch.long))  # key updates
        self.register_buffer("probe", torch.zeros(2, device=device, dtype=dtype))  # top-set mode count, tokens
        self.register_buffer("revived", torch.zeros((), device=device, dtype=torch.long))  # keys revived
        # the direction common to all tokens (issue 22: a shared direction of the residual stream
        # precedes the collapse): Σ x and Σ q over the window's real tokens (rows 0 and 1, d_model
        # wide; none without d_model), and [Σ ||x||², tokens, Σ ||q||², routed rows]
        self.register_buffer("shared_sums", torch.zeros(2, d_model, device=device, dtype=dtype))
        self.register_buffer("shared_norms", torch.zeros(4, device=device, dtype=dtype))
        # since the start
        self.register_buffer("step", torch.zeros((), device=device, dtype=torch.long))  # key updates so far
        self.register_buffer("last_used", torch.full((N,), -1, device=device, dtype=torch.long))  # update step
        self.register_buffer("ever_used", torch.zeros(N, device=device, dtype=torch.bool))
        self.probe_next = False  # measure the top-set share on the next training batch (a sync on GPUs)
        self.steps_taken = 0  # = step, kept on the host (reading the buffer would synchronize a GPU)

    @torch.no_grad()
    def observe_routing(self, indices: Tensor, scores: Tensor) -> None:
        """A training forward's routing: ``indices`` / ``scores`` ``(T, k)`` of the real tokens
        (-1 / 0 in empty slots)."""
        valid = (indices >= 0).to(self.scores.dtype)
        kept = scores.to(self.scores.dtype) * valid
        # the top-1 score: the best selected one (slot 0 unless a selection bias chose the order)
        top1 = kept.masked_fill(indices < 0, float("-inf")).amax(dim=1, keepdim=True) * valid[:, :1]
        # one reduction for the four sums (the step's per-op overhead is what this costs)
        sums = torch.cat([top1.nan_to_num(0.0, neginf=0.0), kept, valid[:, :1], valid], dim=1).sum(0)
        k = indices.shape[1]
        self.scores += torch.stack([sums[0], sums[1:1 + k].sum(), sums[2 + k:].sum(), sums[1 + k]])
        if self.probe_next:
            self.probe_next = False
            self._probe(indices)

    @torch.no_grad()
    def observe_shared(self, x: Tensor, x_real: Tensor | None, q: Tensor, q_real: Tensor | None) -> None:
        """A training forward's layer input ``x`` ``(T, d)`` and routed queries ``q`` ``(R, d)``,
        with masks of their real rows (None: all real): the sums of :meth:`shared_share`."""
        if not self.shared_sums.shape[1]:
            return
        norms = []
        for row, (t, real) in enumerate(((x, x_real), (q, q_real))):
            t, count = real_rows(t, real, self.shared_sums.dtype)
            self.shared_sums[row] += t.sum(0)
            norms += [t.square().sum(), count]
        self.shared_norms += torch.stack(norms)

    def shared_share(self) -> tuple[float | None, float | None]:
        """(input, query): ||mean||² / mean ||·||² over the window's real rows; 1 when every
        row is the same vector, ~1/n for n rows in random directions; None without data."""
        sums, norms = self.shared_sums.double().cpu(), self.shared_norms.double().cpu().tolist()
        out = []
        for row, (sq, n) in enumerate(((norms[0], norms[1]), (norms[2], norms[3]))):
            out.append(float(sums[row].square().sum()) / (n * sq) if n and sq and sums.shape[1] else None)
        return out[0], out[1]

    def _probe(self, indices: Tensor) -> None:
        """The count of the most common top-k set among the routed tokens (a host sync)."""
        rows = torch.sort(indices[indices[:, 0] >= 0], dim=1).values  # each routed token's set, sorted
        if not rows.shape[0]:
            return
        n, k = self.counts.shape[0] + 1, rows.shape[1]  # +1: an empty slot (-1) is a value too
        if k * math.log2(n) < 62:  # one int64 code per set: a 1-D unique, far faster than unique(dim=0)
            weights = n ** torch.arange(k - 1, -1, -1, device=rows.device, dtype=torch.long)
            codes = ((rows + 1) * weights).sum(1)
            counts = torch.unique(codes, return_counts=True)[1]
        else:
            counts = torch.unique(rows, dim=0, return_counts=True)[1]
        self.probe.copy_(torch.stack([counts.max().to(self.probe.dtype),
                                      torch.tensor(float(rows.shape[0]), device=self.probe.device)]))

    @torch.no_grad()
    def observe_update(self, counts: Tensor, keys_before: Tensor, keys_after: Tensor) -> None:
        """A key-store update: the step's selections per expert and the keys' movement."""
        self.counts += counts
        used = counts > 0
        self.last_used.masked_fill_(used, self.steps_taken)  # (the host's copy of step: no sync)
        self.ever_used |= used
        moved = torch.linalg.vector_norm(keys_after - keys_before, dim=1).to(self.move.dtype)
        self.move[0] += moved.mean()
        torch.maximum(self.move[1], moved.max(), out=self.move[1])
        self.updates += 1
        self.steps_taken += 1
        self.step.fill_(self.steps_taken)

    def dead(self, after: int) -> Tensor:
        """(N,) bool: experts not selected in any of the last ``after`` key updates."""
        return (self.step - 1 - self.last_used) >= after

    def reset_window(self) -> None:
        for buf in (self.counts, self.scores, self.move, self.updates, self.probe, self.revived, self.shared_sums,
                    self.shared_norms):
            buf.zero_()

    def window_reducibles(self) -> list[Tensor]:
        """The sums of the forward passes, which data-parallel ranks add before a report
        (the update sums come from statistics that are already all-reduced)."""
        return [self.scores, self.probe, self.shared_sums, self.shared_norms]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        absent = [k for k in self._buffers if prefix + k not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(absent) == len(self._buffers):  # a checkpoint from before the telemetry: start it afresh
            missing_keys[:] = [k for k in missing_keys if not k.startswith(prefix)]
        elif set(absent) <= set(self.LATER_BUFFERS):  # from before those buffers: they start at zero
            missing_keys[:] = [k for k in missing_keys if k not in {prefix + b for b in absent}]
        self.steps_taken = int(self.step)


class UsageRecorder(nn.Module):
    """Which experts a layer selected while recording is on (validation, measurement):
    ``counts`` ``(N,)`` selections per expert and ``tokens`` real tokens routed since the
    last :meth:`start`, and ``last_indices`` ``(B·S, k)`` of the last forward (-1 in
    empty slots and at padding). Not saved with the model."""

    def __init__(self, num_experts: int, device=None):
        super().__init__()
        self.register_buffer("counts", torch.zeros(num_experts, device=device, dtype=torch.long), persistent=False)
        self.register_buffer("tokens", torch.zeros((), device=device, dtype=torch.long), persistent=False)
        self.enabled = False
        self.last_indices: Tensor | None = None

    def reset(self) -> None:
        self.counts.zero_()
        self.tokens.zero_()

    def start(self) -> None:
        """Zero the counts and record from now on."""
        self.reset()
        self.enabled = True

    def stop(self) -> None:
        self.enabled = False
        self.last_indices = None

    @torch.no_grad()
    def observe(self, indices: Tensor, token_mask: Tensor | None) -> None:
        """A forward's ``indices`` ``(B·S, k)`` and ``token_mask`` ``(B, S)`` (None: all real)."""
        if not self.enabled:
            return
        valid = indices[indices >= 0]
        self.counts += torch.bincount(valid, minlength=self.counts.shape[0])
        self.tokens += int(token_mask.sum()) if token_mask is not None else indices.shape[0]
        self.last_indices = indices.detach()

    @property
    def experts_per_token(self) -> float:
        """Mean number of experts per real token since :meth:`start`."""
        return float(self.counts.sum()) / max(int(self.tokens), 1)
