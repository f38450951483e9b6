"""Where a training step's time goes: torch.profiler over Shoal's loop on the --gpu preset of
benchmarks/trainer_vs_trl.py (a ~0.47B Llama, full fine-tuning, bf16 autocast, packed rows of 2048).

    python benchmarks/trainer_profile.py [--records N] [--steps S] [--padded]

Trains S steps (default 9) and profiles the last three after three skipped and three warm-up ones, then prints the operators
by device time and by CPU time, and the share of device time spent in matrix products (the
useful work; the rest is what an MFU improvement has to remove). On a machine without CUDA it
profiles the CPU preset instead (hidden 256 x 4 layers, LoRA), which only checks the script.
Session 7's H200 run (docs/trainer.md): 220 ms of GPU time per packed step, 25 % of it in
matrix products.

Ends with `RESULT trainer_profile_step_ms <device (or CPU) ms per profiled step>` and
`RESULT trainer_profile_matmul_pct <share of that time in aten::mm / addmm / bmm>`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=9, help="optimizer steps in all (>= 9)")
    ap.add_argument("--padded", action="store_true", help="padded batches of 64 instead of packed rows")
    args = ap.parse_args()
    if args.steps < 9:  # with no step skipped before the warm-up, torch's profiler recorded nothing
        sys.exit("error: --steps must be at least 9 (3 skipped, 3 warm-up, 3 profiled)")

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import trainer_vs_trl as B
    from trainer.loop import Hooks, train

    gpu = torch.cuda.is_available()
    preset = argparse.Namespace(gpu=gpu, records=args.records, val_records=32, seed=0, epochs=1,
                                max_length=2048 if gpu else 256, batch_size=64 if gpu else 8,
                                packed_batch_size=8 if gpu else 1, lr=2e-5 if gpu else 1e-3, threads=1,
                                clock="wall" if gpu else "cpu")
    work = Path(tempfile.mkdtemp())
    assets = B.build_assets(work, preset)
    cfg = B.train_config(assets, preset, str(work / "out"), packing=not args.padded).model_copy(
        update={"max_steps": args.steps, "eval_every_steps": 10**9})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    prof = profile(activities=activities, schedule=schedule(wait=args.steps - 6, warmup=3, active=3))
    steps: list[dict] = []

    def progress(event: dict) -> None:
        if event["type"] == "step":
            prof.step()
            steps.append(event)

    prof.start()
    t0 = time.perf_counter()
    train(cfg, Hooks(progress=progress))
    wall = time.perf_counter() - t0
    prof.stop()
    print(f"{'cuda: ' + torch.cuda.get_device_name() if gpu else 'cpu'}; {len(steps)} steps in {wall:.1f} s; "
          f"tokens/s per step: {[round(e['tokens_per_s']) for e in steps]}; mfu: "
          f"{[None if e['mfu'] is None else round(e['mfu'], 3) for e in steps]}")
    events = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    sort = "cuda_time_total" if gpu else "cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25, max_name_column_width=70))
    if gpu:
        print(events.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
    ops = [e for e in events if not e.key.startswith("ProfilerStep")]  # the step ranges span the ops
    total = sum(getattr(e, key) for e in ops)  # µs over the 3 profiled steps
    matmul = sum(getattr(e, key) for e in ops if e.key in MATMULS)
    print(f"RESULT trainer_profile_step_ms {total / 3 / 1000:.1f}")
    print(f"RESULT trainer_profile_matmul_pct {100 * matmul / total:.1f}")


if __name__ == "__main__":
    main()
