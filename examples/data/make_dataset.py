"""Generate the tiny-sft example dataset (seeded, stdlib only).

    python examples/data/make_dataset.py [--out DIR] [--train N] [--val N] [--seed S]

Three learnable tasks, mixed: small additions ("What is 17 + 25?" -> " 42"),
successors ("What comes after 7?" -> " 8") and uppercasing ("Uppercase: apple"
-> " APPLE"). Records are {"prompt", "completion"} JSON lines.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = """apple river stone cloud green table music light house water paper
tiger bread chair smile ocean plant dream night happy storm quiet sugar horse
lemon metal grape train honey piano robot money field candy eagle juice lunch
magic north olive pilot queen salad tower voice wheat zebra""".split()


def make_record(rng: random.Random) -> dict:
    """One random record from one of the three tasks."""
    task = rng.choice(("add", "next", "upper"))
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return {"prompt": f"What is {a} + {b}?", "completion": f" {a + b}"}
    if task == "next":
        n = rng.randint(0, 98)
        return {"prompt": f"What comes after {n}?", "completion": f" {n + 1}"}
    word = rng.choice(WORDS)
    return {"prompt": f"Uppercase: {word}", "completion": f" {word.upper()}"}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "tiny-sft"))
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    records = [make_record(rng) for _ in range(args.train + args.val)]
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", records[: args.train])
    write_jsonl(out / "val.jsonl", records[args.train:])
    print(f"wrote {args.train} train and {args.val} val records to {out}")


if __name__ == "__main__":
    main()
