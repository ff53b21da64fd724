"""Training throughput of a SoME model and where a step's time goes.

    python benchmarks/bench_train.py                      # preset tiny on the CPU
    python benchmarks/bench_train.py --device cuda --preset A4 --set batch_size=8

Times full optimizer steps (forward, backward, clipping, AdamW, key-store
update) on random tokens, then profiles a few of them with torch.profiler and
splits the step time into the SoME ops (every ``some::*`` op, forward and
backward), the attention kernel (scaled_dot_product_attention, forward and
backward) and the rest (router MLP, projections, norms, embedding, LM head,
loss, optimizer, Python).

On a machine shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``:
OpenMP threads that spin while a peer thread is descheduled made steps of
`tiny` 10-16x slower here (2 cores, another process busy).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from some import ops
from some.engine import make_optimizer, train_step
from some.nn import SoMEForCausalLM, format_parameter_counts
from some.runs import apply_overrides, get_preset


def categorize(name: str) -> str | None:
    if name.startswith("some::"):
        return "SoME ops (some::*)"
    if "scaled_dot_product" in name or "ScaledDotProduct" in name:
        return "attention (SDPA)"
    return None


def make_step(model, optimizer, batch, config):
    """The training run's own optimizer step (forward, loss, backward, clip, AdamW, key-store update)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = iter(range(1, 1 << 62))

    def step():
        train_step(model, batch, optimizer, config, step=next(count), total_steps=1000,
                   grad_accum=config.grad_accum, trainable=trainable)

    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "torch"], help="ops backend (some.ops)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps for the breakdown")
    args = p.parse_args(argv)

    ops.use_backend(args.backend)
    config = apply_overrides(get_preset(args.preset), args.overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SoMEForCausalLM(config, device=device).train()
    optimizer = make_optimizer(model, config)
    B, S = config.batch_size, config.seq_len
    ids = torch.randint(0, config.vocab_size, (B, S), device=device)
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1),
             "attention_mask": torch.ones(B, S, dtype=torch.bool, device=device)}
    step = make_step(model, optimizer, batch, config)

    for _ in range(args.warmup):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    step_s = (time.perf_counter() - t0) / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile_steps):
            step()
        synchronize(device)
        profiled_s = (time.perf_counter() - t0) / args.profile_steps  # with the profiler's overhead
    # Count each categorized op once: skip events nested inside another categorized event.
    spent = {"SoME ops (some::*)": 0.0, "attention (SDPA)": 0.0}
    for event in prof.events():
        category = categorize(event.name)
        if category is None:
            continue
        parent = event.cpu_parent
        while parent is not None and categorize(parent.name) is None:
            parent = parent.cpu_parent
        if parent is not None:
            continue
        us = event.device_time_total if device.type == "cuda" else event.cpu_time_total
        spent[category] += us / 1e6 / args.profile_steps
    rows = list(spent.items())
    rows.append(("rest", max(profiled_s - sum(spent.values()), 0.0)))

    total, trainable = model.parameter_counts()
    print(f"preset {args.preset}: d={config.d_model}, L={config.n_layers}, N={config.num_experts}, "
          f"k={config.top_k}, h={config.d_ffn}, batch {B} x {S} tokens, device {device}, "
          f"{torch.get_num_threads()} CPU threads, ops backend {ops.backend_for(device)}")
    print(format_parameter_counts(total, trainable).replace("\n", "; "))
    print(f"train throughput: {B * S / step_s:,.0f} tokens/s ({1e3 * step_s:.1f} ms per optimizer step)")
    print()
    print(f"{'part of a step':<22} {'ms/step':>9} {'share':>7}")
    for name, seconds in rows:
        print(f"{name:<22} {1e3 * seconds:>9.1f} {100 * seconds / profiled_s:>6.1f}%")
    note = "device time" if device.type == "cuda" else "CPU time"
    print(f"(under torch.profiler, {1e3 * profiled_s:.1f} ms per step averaged over {args.profile_steps} steps; "
          f"op times are {note}; rest = step - ops)")


if __name__ == "__main__":
    main()
