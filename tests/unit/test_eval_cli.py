"""`tcp-eval` on run directories: own Pilot, a transferred Copilot, and refused transfers."""

import json
from types import SimpleNamespace

import pytest
import torch

from tcp.cli.tcp_eval import eval_main
from tcp.config import dump_yaml, load_config
from tcp.evaluation.run_loading import TransferError, check_transfer
from tests.helpers import tiny_copilot, tiny_pilot

SMALL = ["data.val_size=6", "data.test_size=6", "eval.lambdas=[1.0,4.0]",
         "eval.max_new_tokens=4", "eval.batch_size=4", "copilot.hidden_size=24",
         "copilot.intermediate_size=48", "copilot.num_layers=4", "copilot.init_from=none"]


def make_run(path, *, d=32, seed=0, vocab_extra=0):
    """A finished run's layout (config.yaml, tokenizer/, final/pilot, final/copilot.pt)."""
    model, tok = tiny_pilot(seed=seed, d=d)
    if vocab_extra:
        model.resize_token_embeddings(model.config.vocab_size + vocab_extra)
    cfg = load_config("configs/default.yaml", [f"output_dir={path}", *SMALL])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_yaml(cfg))
    tok.save_pretrained(path / "tokenizer")
    model.save_pretrained(path / "final" / "pilot")
    cop = tiny_copilot(model.config.vocab_size, d, randomize_head=True)
    torch.save(cop.state_dict(), path / "final" / "copilot.pt")
    return path


def test_eval_own_run_writes_results_and_plots(tmp_path, capsys):
    run = make_run(tmp_path / "a")
    assert eval_main([str(run), "--limit", "4"]) == 0
    res = json.loads((run / "eval" / "eval.json").read_text())
    pc, v = res["pilot+copilot"], res["validation"]
    assert res["test_size"] == 4 and pc["lambda"] in (0.0, 1.0, 4.0)
    # λ = 0 (Copilot off) unless some λ > 0 beats the Pilot on validation beyond noise
    alpha = v["lambda_significance"] / len(v["sweep"])
    passing = [s for s in v["sweep"]
               if s["accuracy"] > v["pilot_accuracy"] and s["mcnemar_p"] < alpha]
    assert (pc["lambda"] == 0) == (not passing)
    lines = (run / "eval" / "eval.predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4  # one per test example, both decodes in it (tcp.evaluation.predictions)
    assert res["decoding"]["answer_format"] == "numeric"
    assert len(res["rectification"]["steps"]) >= 1
    assert (run / "eval" / "eval" / "rectification.png").stat().st_size > 0
    assert "validation λ sweep" in capsys.readouterr().out


def test_transfer_to_a_compatible_pilot(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", seed=1)
    assert eval_main([str(a), "--pilot", str(b), "--lambda", "1.0", "--limit", "4",
                      "eval.strategy=beam", "eval.num_beams=2"]) == 0
    res = json.loads((a / "eval" / "transfer-b.json").read_text())
    assert res["pilot"]["source"].endswith("b/final/pilot")
    assert res["pilot+copilot"]["lambda"] == 1.0 and res["decoding"]["strategy"] == "beam"


@pytest.mark.parametrize("kw,msg", [({"d": 48}, "hidden size 48"),
                                    ({"vocab_extra": 3}, "vocabulary size 103")])
def test_transfer_refuses_incompatible_pilots(tmp_path, capsys, kw, msg):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", **kw)
    assert eval_main([str(a), "--pilot", str(b)]) == 2
    err = capsys.readouterr().err
    assert "cannot be used with this Pilot" in err and msg in err
    assert not (a / "eval").exists()


def test_transfer_refuses_a_tokenizer_with_other_ids():
    tok_a = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1, "c": 2})
    tok_b = SimpleNamespace(get_vocab=lambda: {"a": 0, "c": 1, "b": 2})
    cfg = SimpleNamespace(vocab_size=3, hidden_size=8)
    check_transfer(copilot_vocab=3, copilot_d_pilot=8, pilot_config=cfg,
                   copilot_tokenizer=tok_a, pilot_tokenizer=tok_a)
    with pytest.raises(TransferError, match="tokenizers differ in 2 token ids"):
        check_transfer(copilot_vocab=3, copilot_d_pilot=8, pilot_config=cfg,
                       copilot_tokenizer=tok_a, pilot_tokenizer=tok_b)


def test_missing_run_and_bad_override_fail_clearly(tmp_path, capsys):
    assert eval_main([str(tmp_path / "nope")]) == 2
    assert "not a tcp run directory" in capsys.readouterr().err
    run = make_run(tmp_path / "a")
    assert eval_main([str(run), "eval.answer_format=numbers"]) == 2
    assert "answer_format" in capsys.readouterr().err


def test_eval_on_another_dataset_from_jsonl(tmp_path):
    """Any dataset the loader accepts: local JSONL with multiple-choice answers, format inferred."""
    run = make_run(tmp_path / "a")
    rows = [{"question": f"Which is {i}? answer1: {i} answer2: {i + 1}\nA: ",
             "gold": "answer1" if i % 2 else "answer2"} for i in range(5)]
    for split in ("val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert eval_main([str(run), "data.source=jsonl", f"data.train_path={tmp_path}/val.jsonl",
                      f"data.val_path={tmp_path}/val.jsonl",
                      f"data.test_path={tmp_path}/test.jsonl", "data.prompt_field=question",
                      "data.answer_field=gold", "--name", "mc"]) == 0
    res = json.loads((run / "eval" / "mc.json").read_text())
    assert res["test_size"] == 5 and res["decoding"]["answer_format"] == "choice"


def test_eval_logs_an_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    run = make_run(tmp_path / "a")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert eval_main([str(run), "--limit", "3", "--lambda", "1.0", "--mlflow",
                      f"tracking.uri={uri}", "tracking.experiment=evals"]) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("evals")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == "a:eval" and "test_accuracy_pilot_copilot" in r.data.metrics
    assert {"eval_max_new_tokens", "val_truncated_share", "test_truncated_share",
            "copilot_off"} <= set(r.data.metrics)
    assert {a.path for a in client.list_artifacts(r.info.run_id, "plots")} >= \
        {"plots/rectification.png"}
