"""Bad data is one line naming file:line (or row) and field, exit 2, before any model loads;
over-long and unknown-token shares above their limits stop the run the same way."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tcp.config import DataConfig, load_config
from tcp.data.loaders import DataError, load_split
from tcp.data.prepare import prepare_data
from tcp.data.tokenizer import build_char_tokenizer
from tcp.errors import RunError

ROOT = Path(__file__).resolve().parents[2]
GOOD = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def load(path: Path, **kw) -> list:
    return load_split(DataConfig(source="jsonl", train_path=str(path), **kw), "train", seed=0)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, RunError) and e.value.kind == "data"
    return msg


def test_missing_field_names_line_and_field_never_none(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [*GOOD[:2], {"prompt": "3+1="}])
    with pytest.raises(DataError) as e:
        load(p)
    assert one_line(e).startswith(f"{p}:3: no field 'answer' (the row has: prompt); set "
                                  "data.answer_field")


def test_null_field_is_an_error_not_the_text_none(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [GOOD[0], {"prompt": "x", "answer": None}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'answer' \(answer\) is null"):
        load(p)


def test_null_field_in_parquet_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([*GOOD, {"prompt": None, "answer": "1"}]),
                   tmp_path / "d.parquet")
    cfg = DataConfig(source="parquet", train_path=str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet row 5: field 'prompt' \(prompt\) is null"):
        load_split(cfg, "train", seed=0)


def test_empty_field_names_line_and_field(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"q": "y", "a": "1"}, {"q": "x", "a": " "}])
    with pytest.raises(DataError) as e:
        load(p, prompt_field="q", answer_field="a")
    assert one_line(e).startswith(f"{p}:2: empty answer (field 'a')")


def test_empty_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError) as e:
        load(p)
    assert one_line(e).startswith(f"{p}: no records (the file is empty); point data.train_path")


def test_invalid_json_names_its_line(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [GOOD[0], "", '{"prompt": "a", "answer": 1,}'])
    with pytest.raises(DataError) as e:
        load(p)
    assert one_line(e).startswith(f"{p}:3: invalid JSON (")
    assert "one JSON object per line" in str(e.value)


def test_non_utf8_bytes_name_line_and_byte(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD[0]).encode() + b'\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError) as e:
        load(p)
    assert one_line(e).startswith(f"{p}:2: not UTF-8 (byte 0xe9 at column 16); re-encode")


def test_template_with_an_unknown_field(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "answer": "2"}])
    with pytest.raises(DataError) as e:
        load(p, prompt_template="Q: {questoin}\nA: ")
    assert one_line(e).startswith(f"{p}:1: data.prompt_template uses {{questoin}}, which the "
                                  "row does not have (it has: answer, question)")
    with pytest.raises(DataError, match=r"data\.answer_template is not a valid format string"):
        load(p, answer_template="{answer")


def test_template_fields_may_be_empty_but_not_null(tmp_path):
    rows = [{"instruction": "add", "input": "", "output": "2"},
            {"instruction": "add", "input": None, "output": "3"}]
    p = jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(prompt_template="{instruction} {input}", answer_field="output")
    assert load(jsonl(tmp_path / "ok.jsonl", rows[:1]), **kw)[0]["prompt"] == "add "
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'input' .*prompt_template.* null"):
        load(p, **kw)


def test_missing_file_and_unset_split_path_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"data\.train_path: file not found"):
        load(tmp_path / "nope.jsonl")
    cfg = DataConfig(source="jsonl", train_path=str(jsonl(tmp_path / "d.jsonl", GOOD)))
    with pytest.raises(DataError, match=r"data\.val_path is required for the validation split"):
        load_split(cfg, "validation", seed=0)


def run_cfg(tmp_path: Path, train: list, *more: str):
    """A jsonl run config: `train` as the training file, GOOD as validation and test."""
    good = jsonl(tmp_path / "good.jsonl", GOOD)
    return load_config(None, ["data.source=jsonl", f"data.train_path="
                              f"{jsonl(tmp_path / 'train.jsonl', train)}",
                              f"data.val_path={good}", f"data.test_path={good}",
                              "model.name_or_path=null", *more])


def test_drop_share_above_the_limit_stops_with_the_keys_to_change(tmp_path):
    rows = [*GOOD] * 19 + [{"prompt": "x" * 40, "answer": "1"}] * 2  # 2 of 97 over 16
    tok = build_char_tokenizer()
    with pytest.raises(DataError) as e:
        prepare_data(run_cfg(tmp_path, rows, "data.max_length=16"), tok)
    assert one_line(e).startswith(
        "train: 2 of 97 samples (2.1%) are longer than data.max_length=16 tokens and would be "
        f"skipped (longest: 43 tokens, {tmp_path / 'train.jsonl'}:96), more than "
        "data.max_drop_frac=0.01; raise data.max_length")
    assert "data.max_drop_frac to accept it" in str(e.value)
    ok = prepare_data(run_cfg(tmp_path, rows, "data.max_length=16", "data.max_drop_frac=0.05"),
                      tok)
    assert ok.reports["train"].skipped_overlength == 2 and len(ok.samples["train"]) == 95
    assert ok.notes == ["[tcp] train: 2 over-long samples skipped, 0 truncated "
                        "(data.max_length=16)"]


def test_unknown_tokens_above_the_limit_stop_and_show_the_text(tmp_path):
    rows = [*GOOD, {"prompt": "caf\u00e9\tau lait", "answer": "1"}]
    tok = build_char_tokenizer()
    with pytest.raises(DataError) as e:
        prepare_data(run_cfg(tmp_path, rows), tok)
    assert one_line(e).startswith(
        f"train: 2 of 38 tokens (5.26%) in 1 samples are the tokenizer's unknown token (first: "
        f"{tmp_path / 'train.jsonl'}:6; text it cannot represent: 'é', '\\t'), more than "
        "data.max_unk_frac=0.001; clean those characters")
    ok = prepare_data(run_cfg(tmp_path, rows, "data.max_unk_frac=0.1"), tok)
    rep = ok.reports["train"]
    assert (rep.unk_tokens, rep.unk_samples, rep.unk_ids) == (2, 1, [5])
    assert ok.results()["train"]["unk_tokens"] == 2 and ok.metrics()["data/train/unk_tokens"] == 2


@pytest.mark.slow
def test_cli_bad_data_exits_2_with_one_line_before_any_model(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps({"prompt": "2+1="}) + "\n")
    good = jsonl(tmp_path / "good.jsonl", GOOD)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launcher/train.py"), "--config",
         str(ROOT / "configs/default.yaml"), "data.source=jsonl", f"data.train_path={bad}",
         f"data.val_path={good}", f"data.test_path={good}", f"output_dir={tmp_path / 'run'}",
         "tracking.enabled=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"data error: {bad}:2: no field 'answer' (the row has: prompt); set "
                    "data.answer_field to the field holding the answer, or data.answer_template")
    assert "Traceback" not in proc.stderr
    assert "Pilot" not in proc.stdout and "base model" not in proc.stdout


def test_tcp_eval_bad_data_exits_2_with_one_line_before_any_model(tmp_path, capsys,
                                                                  monkeypatch):
    import tcp.cli.tcp_eval
    import tcp.evaluation.run_loading
    from tests.unit.test_eval_cli import make_run

    run = make_run(tmp_path / "run")
    capsys.readouterr()  # make_run's own output
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=" "answer": "4"}\n')

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(tcp.evaluation.run_loading, "load_run", no_model)
    code = tcp.cli.tcp_eval.eval_main([str(run), "data.source=jsonl", f"data.train_path={bad}",
                                   f"data.val_path={bad}", f"data.test_path={bad}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"data error: {bad}:2: invalid JSON (Expecting ',' delimiter")
