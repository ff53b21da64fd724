"""What the run options cost per optimizer step, measured in one run:
routing-dynamics logging (issue 13) and torch.compile (issue 14).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_step_options.py            # preset tiny, CPU
    python benchmarks/bench_step_options.py --preset small --steps 20

Candidates (each its own model and optimizer from the same seed, timed in
interleaved rounds so that a change of machine load hits all alike):

  no telemetry   the SoME layers' telemetry calls replaced by no-ops (the step before issue 13)
  dynamics       the default: telemetry on, and every ``interval`` steps the records of
                 dynamics.jsonl computed and serialized (what the trainer logs)
  compiled       dynamics as above, the forward through torch.compile (compile time is
                 excluded: it happens in the warm-up steps and is printed separately)

Printed: median seconds per step, tokens/s, and the ratios dynamics / no telemetry
(the logging overhead) and compiled / dynamics.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from some.analysis import dynamics_records
from some.engine import make_optimizer, train_step
from some.nn import SoMEForCausalLM
from some.runs import apply_overrides, get_preset


class Candidate:
    def __init__(self, name: str, config, batch, *, telemetry: bool, compiled: bool, interval: int):
        torch.manual_seed(0)
        self.name, self.config, self.batch, self.interval = name, config, batch, interval
        self.model = SoMEForCausalLM(config).train()
        if not telemetry:
            for layer in self.model.some_layers():
                layer.telemetry.observe_routing = lambda *a, **k: None
                layer.telemetry.observe_update = lambda *a, **k: None
        self.telemetry = telemetry
        self.optimizer = make_optimizer(self.model, config)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.forward = torch.compile(self.model) if compiled else None
        self.step_no = 0
        self.times: list[float] = []

    def step(self, timed: bool) -> float:
        self.step_no += 1
        t0 = time.perf_counter()
        if self.telemetry and self.step_no % self.interval == 0:
            for layer in self.model.some_layers():
                layer.telemetry.probe_next = True
        train_step(self.model, self.batch, self.optimizer, self.config, step=self.step_no, total_steps=10_000,
                   grad_accum=self.config.grad_accum, trainable=self.trainable, forward=self.forward)
        if self.telemetry and self.step_no % self.interval == 0:
            json.dumps(dynamics_records(self.model, step=self.step_no, dead_after=100))
            for layer in self.model.some_layers():
                layer.telemetry.reset_window()
        dt = time.perf_counter() - t0
        if timed:
            self.times.append(dt)
        return dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=30, help="timed steps per candidate")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per candidate (compilation happens here)")
    p.add_argument("--interval", type=int, default=0, help="steps per dynamics record (0: the run default)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled candidate")
    args = p.parse_args(argv)

    config = apply_overrides(get_preset(args.preset), args.overrides)
    total = config.steps_per_epoch * config.epochs
    interval = args.interval or config.dynamics_interval(total)
    B, S = config.batch_size, config.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, S), generator=g)
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1), "attention_mask": torch.ones(B, S, dtype=torch.bool)}
    cands = [Candidate("no telemetry", config, batch, telemetry=False, compiled=False, interval=interval),
             Candidate("dynamics", config, batch, telemetry=True, compiled=False, interval=interval)]
    if not args.no_compile:
        cands.append(Candidate("compiled", config, batch, telemetry=True, compiled=True, interval=interval))
    print(f"preset {args.preset}: batch {B} x {S} tokens, d={config.d_model}, L={config.n_layers}, "
          f"N={config.num_experts}, k={config.top_k}; dynamics record every {interval} steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for c in cands:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            c.step(timed=False)
        print(f"  warm-up {c.name}: {time.perf_counter() - t0:.1f} s for {args.warmup} steps")
    for _ in range(args.steps):  # interleaved rounds
        for c in cands:
            c.step(timed=True)
    med = {c.name: statistics.median(c.times) for c in cands}
    for c in cands:
        print(f"  {c.name:<13} {1000 * med[c.name]:8.1f} ms/step  {B * S / med[c.name]:10,.0f} tokens/s")
    print(f"  logging overhead (dynamics / no telemetry): {med['dynamics'] / med['no telemetry']:.3f}x")
    if "compiled" in med:
        print(f"  compiled / eager (dynamics): {med['dynamics'] / med['compiled']:.2f}x throughput")


if __name__ == "__main__":
    main()
