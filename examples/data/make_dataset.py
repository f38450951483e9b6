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
    # The same records in the other formats Shoal reads (chat JSONL, Alpaca JSON array).
    chat, alpaca = out.parent / "tiny-chat", out.parent / "tiny-alpaca"
    write_jsonl(chat / "train.jsonl", [to_chat(r, i) for i, r in enumerate(records[: args.train])])
    write_jsonl(chat / "val.jsonl", [to_chat(r, i) for i, r in enumerate(records[args.train:])])
    write_json(alpaca / "train.json", [to_alpaca(r) for r in records[: args.train]])
    write_json(alpaca / "val.json", [to_alpaca(r) for r in records[args.train:]])
    print(f"wrote the same records as chat to {chat} and as Alpaca to {alpaca}")


def to_chat(rec: dict, i: int) -> dict:
    """OpenAI-style messages; every third conversation has a system message."""
    messages = [{"role": "user", "content": rec["prompt"]},
                {"role": "assistant", "content": rec["completion"].strip()}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    return {"messages": messages}


def to_alpaca(rec: dict) -> dict:
    """instruction / input / output; the uppercasing task puts its word in `input`."""
    if rec["prompt"].startswith("Uppercase: "):
        return {"instruction": "Uppercase the word.", "input": rec["prompt"].removeprefix("Uppercase: "),
                "output": rec["completion"].strip()}
    return {"instruction": rec["prompt"], "input": "", "output": rec["completion"].strip()}


def write_json(path: Path, records: list[dict]) -> None:
    """A JSON array, one record per line (so problems can be reported by line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")


if __name__ == "__main__":
    main()
