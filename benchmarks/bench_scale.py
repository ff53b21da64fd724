"""Cost of many experts: one training step of the `small` preset (16 x 128 tokens,
d = 128, L = 4, k = 4, h = 256) for N experts per layer, stored or procedural, split
into forward / backward / optimizer / key-store update (``model.update_keys``), with
the peak RSS of a process that builds the model and takes the steps.

    python benchmarks/bench_scale.py                       # the default table
    python benchmarks/bench_scale.py --n 64 2048 --storage materialized --steps 3
    python benchmarks/bench_scale.py --device cuda --n 64 2048 16384 --storage procedural

Each (N, storage) runs in its own process (its own peak RSS), one after the other, all
in this one invocation: the ratios step(N) / step(64) compare figures measured in the
same run. Times are the median of --steps steps after --warmup steps. Materialized
experts are skipped where they would not fit in --max-expert-gib.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_N = [64, 256, 1024, 2048, 4096, 16384]
PHASES = ("step", "forward", "backward", "optimizer", "key_update")


def measure(n: int, storage: str, steps: int, warmup: int, device: str = "cpu") -> dict:
    import torch

    from some.engine import make_optimizer
    from some.nn import SoMEForCausalLM, lm_loss
    from some.runs import apply_overrides, get_preset

    config = apply_overrides(get_preset("small"), [f"num_experts={n}", f"expert_storage={storage}"])
    torch.manual_seed(0)
    dev = torch.device(device)
    model = SoMEForCausalLM(config, device=dev).train()
    optimizer = make_optimizer(model, config)
    B, S = config.batch_size, config.seq_len
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in PHASES}

    def now() -> float:  # a GPU's queued work belongs to the phase that queued it
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    for i in range(warmup + steps):
        ids = torch.randint(0, config.vocab_size, (B, S), generator=gen).to(dev)
        mask = torch.ones(B, S, dtype=torch.bool, device=dev)
        t0 = now()
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model(ids, mask).logits, ids.roll(-1, 1), mask)
        t1 = now()
        loss.backward()
        t2 = now()
        optimizer.step()
        t3 = now()
        model.update_keys(wait=True)
        t4 = now()
        if i >= warmup:
            for name, value in zip(PHASES, (t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[name].append(value)
    result = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    result.update(n=n, storage=storage, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  threads=torch.get_num_threads(), torch=torch.__version__, device=str(dev))
    if dev.type == "cuda":
        result.update(peak_cuda_mib=torch.cuda.max_memory_allocated(dev) / 2**20, gpu=torch.cuda.get_device_name(dev))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=DEFAULT_N, help="experts per layer")
    p.add_argument("--storage", nargs="+", default=["materialized", "procedural"],
                   choices=["materialized", "procedural"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-expert-gib", type=float, default=6.0,
                   help="skip materialized experts above this many GiB (float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--one", nargs=2, metavar=("N", "STORAGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args.steps, args.warmup, args.device)))
        return

    # small preset: L = 4 SoME layers, experts of d x h + h + h x d + d parameters
    d, h, layers = 128, 256, 4
    rows = []
    for storage in args.storage:
        for n in args.n:
            gib = layers * n * (2 * d * h + h + d) * 4 / 2**30
            if storage == "materialized" and gib > args.max_expert_gib:
                print(f"N = {n:>6} {storage}: skipped ({gib:.1f} GiB of float32 experts)", flush=True)
                continue
            out = subprocess.run([sys.executable, __file__, "--one", str(n), storage, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--device", args.device], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                print(f"N = {n:>6} {storage}: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"N = {n:>6} {storage:<12} step {row['step']:9.1f} ms  (forward {row['forward']:.1f}, "
                  f"backward {row['backward']:.1f}, optimizer {row['optimizer']:.1f}, key update "
                  f"{row['key_update']:.1f})  peak RSS {row['peak_rss_mib']:,.0f} MiB", flush=True)

    where = rows[0].get("gpu", platform.machine()) if rows else platform.machine()
    print(f"\n{where}, {rows[0]['threads'] if rows else '?'} threads, torch "
          f"{rows[0]['torch'] if rows else '?'}; median of {args.steps} steps after {args.warmup}\n")
    print("| N | storage | step (ms) | forward | backward | optimizer | key update | key update share | "
          "step / step(N=64) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {r["storage"]: r["step"] for r in rows if r["n"] == 64}
    for r in rows:
        ratio = f"{r['step'] / base[r['storage']]:.2f}" if r["storage"] in base else "–"
        print(f"| {r['n']:,} | {r['storage']} | {r['step']:,.0f} | {r['forward']:,.0f} | {r['backward']:,.0f} | "
              f"{r['optimizer']:,.0f} | {r['key_update']:,.1f} | {100 * r['key_update'] / r['step']:.1f} % | "
              f"{ratio} | {r['peak_rss_mib']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
