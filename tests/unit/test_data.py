"""Embedded task, tokenizer, loaders, tokenisation report and rank sharding."""

import json

import pytest
import torch

from tcp.config import DataConfig, dump_yaml, load_config, to_dict
from tcp.data import arithmetic
from tcp.data.collate import batch_indices, collate, tokenize_records
from tcp.data.loaders import DataError, load_split
from tcp.data.prepare import auto_max_length, model_context, planned_max_length, prepare_data
from tcp.data.tokenizer import build_char_tokenizer


def test_generator_is_deterministic_and_splits_differ():
    a = arithmetic.generate(0, "train", 50)
    assert a == arithmetic.generate(0, "train", 50)
    assert a != arithmetic.generate(1, "train", 50)
    val = {r["prompt"] for r in arithmetic.generate(0, "validation", 200)}
    test = {r["prompt"] for r in arithmetic.generate(0, "test", 200)}
    assert len(val & test) < 5  # independent draws; collisions are possible but rare
    assert {r["op"] for r in a} == set(arithmetic.OPS)


def test_answers_are_correct():
    for r in arithmetic.generate(3, "train", 300):
        assert r["answer"].lstrip("-").isdigit()
    p = arithmetic.make_problem(0, "base", 1)
    assert p.prompt.startswith("Q: ")


def test_tokenizer_round_trip_and_save(tmp_path):
    tok = build_char_tokenizer()
    text = "Q: Ann has 12 apples.\nA: 7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_tokenize_counts_skips_and_truncations():
    tok = build_char_tokenizer()
    recs = [{"prompt": "x" * 50, "answer": "12"}, {"prompt": "short", "answer": "3"}]
    kept, rep = tokenize_records(recs, tok, max_length=20, overlength="skip")
    assert rep.skipped_overlength == 1 and rep.kept == 1 and kept[0].sample_id == 1
    kept, rep = tokenize_records(recs, tok, max_length=20, overlength="truncate")
    assert rep.truncated == 1 and rep.kept == 2
    assert len(kept[0].input_ids) == 20 and kept[0].input_ids[0] == tok.bos_token_id
    assert tok.decode(kept[0].input_ids[kept[0].prompt_len:-1]) == "12"


def test_collate_masks_loss_to_answer_tokens():
    tok = build_char_tokenizer()
    samples, _ = tokenize_records([{"prompt": "ab", "answer": "7"},
                                   {"prompt": "abcd", "answer": "42"}], tok, max_length=32)
    b = collate(samples, tok.pad_token_id)
    assert b["target_len"].tolist() == [2, 3]  # answer + EOS
    lab = b["labels"][1]
    assert tok.decode(lab[lab >= 0][:-1].tolist()) == "42"
    assert (b["labels"][0][b["attention_mask"][0] == 0] == -100).all()


def test_empty_answer_is_a_clear_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "hi", "a": "1"}) + "\n" + json.dumps({"q": "x", "a": " "}))
    cfg = DataConfig(source="jsonl", train_path=str(path), prompt_field="q", answer_field="a")
    with pytest.raises(DataError, match=r"d\.jsonl:2: empty answer \(field 'a'\)"):
        load_split(cfg, "train", seed=0)


def test_jsonl_and_parquet_with_templates(tmp_path):
    rows = [{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(5)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for source, path in (("jsonl", jl), ("parquet", tmp_path / "d.parquet")):
        cfg = DataConfig(source=source, train_path=str(path), prompt_template="Q: {question}\nA: ",
                         answer_field="answer")
        recs = load_split(cfg, "train", seed=0)
        assert recs[2] == {"prompt": "Q: 2+1?\nA: ", "answer": "3"}


def test_missing_field_names_the_fix(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "hi", "a": "1"}))
    with pytest.raises(DataError, match="prompt_field"):
        load_split(DataConfig(source="jsonl", train_path=str(path)), "train", seed=0)


def test_hf_dataset_offline_is_one_clear_error():
    cfg = DataConfig(source="hf", train_path="surely-not/a-dataset-xyz")
    with pytest.raises(RuntimeError, match="could not load HF dataset"):
        load_split(cfg, "train", seed=0)


def test_batch_indices_partition_global_batches_across_ranks():
    kw = dict(seed=3, micro_batch_size=4, num_samples=10)
    for step in range(6):
        r0 = batch_indices(step=step, rank=0, world_size=2, **kw)
        r1 = batch_indices(step=step, rank=1, world_size=2, **kw)
        assert r0 == batch_indices(step=step, rank=0, world_size=2, **kw)
        assert len(r0) == len(r1) == 4
    # One epoch of 10 samples = the first 10 positions of the stream: a permutation.
    stream = []
    for step in range(3):
        for rank in range(2):
            stream += batch_indices(step=step, rank=rank, world_size=2, **kw)
    assert sorted(stream[:10]) == list(range(10))
    assert torch.tensor(stream[10:20]).unique().numel() == 10


def test_auto_max_length_is_the_percentile_rounded_up_and_capped():
    lengths = list(range(1, 1001))  # the 99.5th percentile (nearest rank) is 995
    assert auto_max_length(lengths, None) == (1000, 995)  # up to a multiple of 8
    assert auto_max_length(lengths, 512) == (512, 995)  # the Pilot's context caps it
    assert auto_max_length([3, 5], None) == (8, 5)


def jsonl_cfg(tmp_path, rows, *more):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return load_config(None, ["data.source=jsonl", f"data.train_path={path}",
                              f"data.val_path={path}", f"data.test_path={path}", *more])


def test_auto_on_a_known_dataset_and_resolved_once(tmp_path):
    # 200 samples of length i + 3 (BOS prompt answer EOS) for prompts of i = 1..199 characters
    # and one of 300: the 99.5th percentile is the 199th, 202 tokens -> 208; one is longer.
    rows = [{"prompt": "x" * i, "answer": "1"} for i in [*range(1, 200), 300]]
    tok = build_char_tokenizer()
    cfg = jsonl_cfg(tmp_path, rows, "data.max_drop_frac=0.01")
    data = prepare_data(cfg, tok, context=model_context(cfg, tok))
    assert data.cfg.data.max_length == 208 and cfg.data.max_length == "auto"
    assert data.notes[0] == (
        "[tcp] data.max_length=auto -> 208: the 99.5th percentile of 200 training samples is "
        "202 tokens, rounded up to a multiple of 8; 1 training samples are longer")
    assert data.results()["max_length"]["auto"]["percentile_length"] == 202
    assert data.reports["train"].skipped_overlength == 1
    with pytest.raises(DataError, match=r"train: 75 of 200 samples \(37\.5%\) .* raise "
                       r"data\.max_length \(the Pilot's context is 128 tokens\)"):
        prepare_data(cfg, tok, context=(128, "a test context"))
    lenient = jsonl_cfg(tmp_path, rows, "data.max_drop_frac=1")
    capped = prepare_data(lenient, tok, context=(128, "a test context"))
    assert capped.cfg.data.max_length == 128 and "capped at 128 (a test context)" in \
        capped.notes[0]
    # config.yaml holds the number: a resume (same data) resolves to the same config.
    again = load_config(_write(tmp_path, dump_yaml(data.cfg)))
    assert to_dict(prepare_data(again, tok, context=(256, "")).cfg) == to_dict(data.cfg)


def _write(tmp_path, text):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_default_run_resolves_and_prints_max_length():
    cfg = load_config("configs/default.yaml")
    assert cfg.data.max_length == "auto"
    tok = build_char_tokenizer()
    data = prepare_data(cfg, tok, context=model_context(cfg, tok))
    assert data.cfg.data.max_length == 72
    assert data.notes == ["[tcp] data.max_length=auto -> 72: the 99.5th percentile of 20000 "
                          "training samples is 70 tokens, rounded up to a multiple of 8; 0 "
                          "training samples are longer"]
    assert set(data.results()) == {"train", "validation", "test", "max_length"}


def test_dry_run_plans_auto_at_the_context():
    from tcp.training.memory_plan import plan

    cfg = load_config(None)
    p = plan(cfg, 1)
    assert any(r.startswith("data.max_length=auto: planned at the Pilot's context "
                            "(model.arch.max_position_embeddings)") for r in p.remarks)
    assert p.engines[0].batch.endswith(f"x {cfg.model.arch.max_position_embeddings} tokens")
    assert planned_max_length(cfg, None)[0].data.max_length == 256
