"""Dataset loading, validation, splitting, encoding and batch order."""

import json

import pytest
import torch

from trainer import data as D


def write_lines(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_load_pairs_reads_valid_records(tmp_path):
    f = write_lines(tmp_path / "ok.jsonl", [
        json.dumps({"prompt": "a", "completion": " b", "extra": 1}).encode(),
        b"",  # blank lines are skipped
        json.dumps({"prompt": "", "completion": " c"}).encode(),
    ])
    pairs = D.load_pairs(f)
    assert [(p["prompt"], p["completion"]) for p in pairs] == [("a", " b"), ("", " c")]
    assert pairs[1]["source"] == f"{f}:3"


def test_load_pairs_lists_every_bad_record_with_file_and_line(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", [
        json.dumps({"prompt": "ok", "completion": " fine"}).encode(),  # 1 good
        b"{not json",                                                  # 2
        b"[1, 2]",                                                     # 3
        json.dumps({"completion": " x"}).encode(),                     # 4
        json.dumps({"prompt": "p", "completion": 5}).encode(),         # 5
        json.dumps({"prompt": "p", "completion": ""}).encode(),        # 6
        b"\xff\xfe",                                                   # 7
    ])
    with pytest.raises(D.DatasetError) as err:
        D.load_pairs(f)
    problems = err.value.problems
    assert [p.split(": ")[0] for p in problems] == [f"{f}:{n}" for n in (2, 3, 4, 5, 6, 7)]
    assert "invalid JSON" in problems[0]
    assert "JSON object" in problems[1]
    assert "missing field 'prompt'" in problems[2]
    assert "'completion' must be a string" in problems[3]
    assert "empty completion" in problems[4]
    assert "UTF-8" in problems[5]
    assert isinstance(err.value, ValueError) and f"{f}:6" in str(err.value)


def test_load_pairs_rejects_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(D.DatasetError, match="empty"):
        D.load_pairs(empty)
    with pytest.raises(D.DatasetError, match="cannot read"):
        D.load_pairs(tmp_path / "missing.jsonl")


def test_split_is_seeded_deterministic_and_complete():
    pairs = [{"prompt": str(i), "completion": "x"} for i in range(50)]
    train, val = D.split_pairs(pairs, 0.2, seed=3)
    assert (train, val) == D.split_pairs(pairs, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(p["prompt"] for p in train + val) == sorted(p["prompt"] for p in pairs)
    assert D.split_pairs(pairs, 0.2, seed=4)[1] != val
    assert len(D.split_pairs(pairs[:2], 0.01, seed=0)[1]) == 1  # never empty when > 0
    assert D.split_pairs(pairs, 0.0, seed=0) == (pairs, [])


def test_labels_mask_prompt_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = D.encode_pair(tok, "What is 2 + 3?", " 5", max_length=64)
    prompt_len = 1 + len(tok("What is 2 + 3?", add_special_tokens=False)["input_ids"])
    completion = tok(" 5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"][0] == tok.bos_token_id
    assert enc["labels"][:prompt_len] == [D.IGNORE_INDEX] * prompt_len
    assert enc["labels"][prompt_len:] == completion == enc["input_ids"][prompt_len:]
    assert len(enc["input_ids"]) == len(enc["labels"]) == prompt_len + len(completion)


def test_truncation_keeps_prompt_and_cuts_completion(tiny_tokenizer):
    enc = D.encode_pair(tiny_tokenizer, "Uppercase:", " apple river stone cloud", max_length=6)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 6
    assert any(label != D.IGNORE_INDEX for label in enc["labels"])
    assert enc["input_ids"][-1] != tiny_tokenizer.eos_token_id  # cut from the right


def test_prompt_without_room_for_completion_names_the_record(tiny_tokenizer):
    long_prompt = " ".join(["apple"] * 20)
    with pytest.raises(ValueError, match="rec.jsonl:7"):
        D.encode_pair(tiny_tokenizer, long_prompt, " x", max_length=8, where="rec.jsonl:7")
    pairs = [{"prompt": long_prompt, "completion": " x", "source": f"f:{i}"} for i in (1, 2)]
    with pytest.raises(D.DatasetError) as err:
        D.encode_pairs(tiny_tokenizer, pairs, max_length=8)
    assert [p.split(":")[1] for p in err.value.problems] == ["1", "2"]


def test_collate_right_pads():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = D.collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["seq_mask"].tolist() == out["attention_mask"].tolist()
    assert all(t.dtype == torch.long for t in out.values())


def test_batch_order_is_a_function_of_seed_and_epoch():
    n, bs = 23, 4
    e0 = D.epoch_batches(n, bs, epoch=0, seed=1)
    assert e0 == D.epoch_batches(n, bs, epoch=0, seed=1)
    assert e0 != D.epoch_batches(n, bs, epoch=1, seed=1)
    assert sorted(i for b in e0 for i in b) == list(range(n))
    assert len(e0) == D.batches_per_epoch(n, bs) == 6


def test_batch_order_shards_evenly_across_ranks():
    n, bs, world = 23, 4, 3
    shards = [D.epoch_batches(n, bs, 0, 1, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in shards} == {D.batches_per_epoch(n, bs, world)}
    assert all(len(b) >= 1 for s in shards for b in s)
    seen = [i for s in shards for b in s for i in b]
    assert set(seen) == set(range(n)) and len(seen) == 24  # padded by one wrap-around


def test_tiny_model_cli_is_deterministic_and_skips_existing(tmp_path, capsys):
    from trainer.tiny import main

    from .conftest import DATA

    data = [str(DATA / "train.jsonl")]
    assert main([str(tmp_path / "a"), "--data", *data]) == 0
    assert main([str(tmp_path / "b"), "--data", *data]) == 0
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main([str(tmp_path / "a"), "--data", *data]) == 0
    assert "nothing to do" in capsys.readouterr().out.splitlines()[-1]


# ---- formats, masking, length policy, summary, packing ------------------------------------
CHAT_MSGS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 3 + 4?"},
             {"role": "assistant", "content": "7"}]


def labelled_text(tok, enc) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, cur = [], []
    for i, label in zip(enc["input_ids"], enc["labels"]):
        if label != D.IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_chat_labels_cover_exactly_the_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = D.encode_record(tok, {"messages": CHAT_MSGS}, max_length=128, policy="error")
    full = tok.apply_chat_template(CHAT_MSGS, tokenize=False)
    assert tok.decode(enc["input_ids"]) == full  # the template's rendering, token for token
    # each assistant span is what the template writes after the generation prompt "assistant:"
    assert labelled_text(tok, enc) == [f" 5{tok.eos_token}\n", f" 7{tok.eos_token}\n"]
    # the unlabelled prefix is what generation sees: conversation + generation prompt
    first = enc["labels"].index(next(x for x in enc["labels"] if x != D.IGNORE_INDEX))
    assert tok.decode(enc["input_ids"][:first]) == tok.apply_chat_template(
        CHAT_MSGS[:2], tokenize=False, add_generation_prompt=True)


def test_chat_without_template_is_a_clear_error(tiny_tokenizer, tmp_path):
    import copy
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(D.ChatTemplateError, match="no chat template"):
        D.encode_record(tok, {"messages": CHAT_MSGS}, 128)
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"messages": CHAT_MSGS}) for _ in range(3)) + "\n")
    with pytest.raises(D.DatasetError) as err:  # said once, not once per record
        D.prepare(f, tok, "auto", 128, "error")
    assert len(err.value.problems) == 1 and "chat template" in err.value.problems[0]


def test_alpaca_labels_cover_exactly_the_output(tiny_tokenizer, tmp_path):
    from trainer.formats import ALPACA_PROMPT
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"instruction": "Uppercase the word.", "input": "apple", "output": "APPLE"}]))
    records, enc, summary = D.prepare(f, tiny_tokenizer, "auto", 512, "error")
    assert summary["format"] == "alpaca"
    ex = enc[0]
    assert labelled_text(tiny_tokenizer, ex) == ["APPLE" + tiny_tokenizer.eos_token]
    prompt = ALPACA_PROMPT.format(instruction="Uppercase the word.", input="apple")
    n_prompt = 1 + len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [D.IGNORE_INDEX] * n_prompt


def test_length_policies_error_truncate_drop(tiny_tokenizer, tmp_path):
    f = tmp_path / "d.jsonl"
    long = {"prompt": "Uppercase:", "completion": " apple river stone cloud green table music light"}
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 1 + 1?", "completion": " 2"}, long,
        {"prompt": " ".join(["apple"] * 30), "completion": " x"}]) + "\n")
    with pytest.raises(D.DatasetError) as err:
        D.prepare(f, tiny_tokenizer, "auto", 12, "error")
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{f}:2", f"{f}:3"]
    assert "longer than max_length=12" in err.value.problems[0]
    assert "max_length_policy" in err.value.problems[0]
    with pytest.raises(D.DatasetError) as err:  # truncation cannot save a prompt that fills it
        D.prepare(f, tiny_tokenizer, "auto", 12, "truncate")
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{f}:3"]
    _, enc, summary = D.prepare(f, tiny_tokenizer, "auto", 12, "drop")
    assert (summary["records"], summary["examples"], summary["dropped"], summary["truncated"]) == (3, 1, 2, 0)
    assert [e["index"] for e in enc] == [0]


def test_summary_counts_tokens_and_histogram(tiny_tokenizer):
    from .conftest import DATA
    _, enc, summary = D.prepare(DATA / "train.jsonl", tiny_tokenizer, "auto", 64, "error")
    assert summary["records"] == summary["examples"] == len(enc) == 400
    assert summary["tokens"] == sum(len(e["input_ids"]) for e in enc)
    assert sum(summary["histogram"].values()) == 400 and set(summary["histogram"]) == {"<=32"}
    assert summary["max_tokens"] == max(len(e["input_ids"]) for e in enc)
    assert 0 < summary["label_tokens"] < summary["tokens"]


def test_pack_keeps_every_example_once_and_resets_positions():
    exs = [{"input_ids": list(range(100 + i, 100 + i + n)), "labels": list(range(100 + i, 100 + i + n))}
           for i, n in enumerate([5, 9, 3, 7, 2, 8, 4, 6])]
    rows = D.pack(exs, max_length=12)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert len(rows) == 4  # 44 tokens in rows of 12: best fit needs the minimum, 4
    seen = []
    for r in rows:
        start = 0
        for n in r["lengths"]:
            assert r["position_ids"][start:start + n] == list(range(n))
            assert r["labels"][start] == D.IGNORE_INDEX  # never predicted from the previous example
            assert r["labels"][start + 1:start + n] == r["input_ids"][start + 1:start + n]
            seen.append(tuple(r["input_ids"][start:start + n]))
            start += n
    assert sorted(seen) == sorted(tuple(e["input_ids"]) for e in exs)
    assert D.pack(exs, 12) == rows  # deterministic


def test_collate_packed_rows_has_positions_and_no_mask():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 0, 1], "lengths": [1, 2]},
            {"input_ids": [8], "labels": [-100], "position_ids": [0], "lengths": [1]}]
    out = D.collate(rows, pad_token_id=0)
    assert "attention_mask" not in out
    assert out["position_ids"].tolist() == [[0, 0, 1], [0, 0, 1]]  # padded tail: its own sequence
    assert out["seq_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert D.padding_waste([out]) == pytest.approx(2 / 6)
