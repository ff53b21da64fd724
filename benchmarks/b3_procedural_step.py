"""The B3 preset (N = 512 experts per layer, L = 10, d = 512, h = 1024: 5.4 B
parameters) built with procedural experts and taking optimizer steps on the
CPU, with the process's peak RSS (docs/method.md §9: with materialized float32 experts
they alone would need 21.6 GB).

    python benchmarks/b3_procedural_step.py                 # batch 2 x 768 tokens, 2 steps
    python benchmarks/b3_procedural_step.py --set batch_size=4 --steps 1
    python benchmarks/b3_procedural_step.py --device cuda --set batch_size=32 --steps 1
"""
from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from some.engine import make_optimizer, train_step
from some.nn import SoMEForCausalLM, format_parameter_counts
from some.runs import apply_overrides, get_preset


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    config = apply_overrides(get_preset("B3"), ["expert_storage=procedural", "batch_size=2", *args.overrides])
    base = rss_mib()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = SoMEForCausalLM(config, device=device).train()
    optimizer = make_optimizer(model, config)
    built = time.perf_counter() - t0
    total, trainable = model.parameter_counts()
    print(format_parameter_counts(total, trainable))
    expert_gib = sum(layer.num_expert_parameters for layer in model.some_layers()) * 4 / 2**30
    print(f"materialized float32 experts would take {expert_gib:.1f} GiB; built in {built:.1f} s, RSS "
          f"{rss_mib():.0f} MiB (before: {base:.0f} MiB)")
    B, S = config.batch_size, config.seq_len
    ids = torch.randint(0, config.vocab_size, (B, S), device=device)
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1),
             "attention_mask": torch.ones(B, S, dtype=torch.bool, device=device)}
    trainable_params = [q for q in model.parameters() if q.requires_grad]
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        r = train_step(model, batch, optimizer, config, step=step, total_steps=100, grad_accum=config.grad_accum,
                       trainable=trainable_params)
        print(f"step {step}: loss {r.loss:.4f}, {time.perf_counter() - t:.1f} s ({B} x {S} tokens)")
    if device.type == "cuda":
        print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
              f"({torch.cuda.get_device_name(device)})")
    print(f"peak RSS of the process: {peak_mib():,.0f} MiB (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()})")


if __name__ == "__main__":
    main()
