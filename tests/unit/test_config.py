"""Config: every shipped file loads; bad input fails early naming the key and the fix."""

from pathlib import Path

import pytest

from tcp.cli.tcp_train import dry_run, train_main
from tcp.config import ConfigError, RunConfig, load_config, render_deepspeed

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


def test_configs_exist():
    assert any(p.name == "default.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_renders(path):
    cfg = load_config(path)
    for engine in ("pilot", "copilot"):
        ds = render_deepspeed(cfg, engine, world_size=8)
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 8 * ds[
            "gradient_accumulation_steps"]
        assert ds["zero_optimization"]["stage"] == getattr(cfg.train, engine).zero.stage


@pytest.mark.parametrize("override, key", [
    ("train.pilot.lrr=1", "train.pilot.lrr"),
    ("train.pilot.lr=-1", "train.pilot.lr"),
    ("train.copilot.zero.stage=5", "train.copilot.zero.stage"),
    ("eval.fusion=sum", "eval.fusion"),
    ("eval.lambdas=[]", "eval.lambdas"),
    ("mistake_log.topk=0", "mistake_log.topk"),
    ("mistake_log.store.on_full=skip", "mistake_log.store.on_full"),
    ("mistake_log.store.compressor=gzip", "mistake_log.store.compressor"),
    ("mistake_log.store.level=42", "mistake_log.store.level"),
    ("mistake_log.window_steps=0", "mistake_log.window_steps"),
    ("train.steps=ten", "train.steps"),
    ("data.source=jsonl", "data.train_path"),
    ("copilot.hidden_size=64", "copilot"),
    ("bogus=1", "bogus"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_overrides_and_scientific_notation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  pilot: {lr: 3e-4}\n")
    cfg = load_config(p, ["train.copilot.lr=5e-4", "eval.lambdas=[0.5, 2]", "seed=7"])
    assert cfg.train.pilot.lr == pytest.approx(3e-4)
    assert cfg.train.copilot.lr == pytest.approx(5e-4)
    assert cfg.eval.lambdas == [0.5, 2.0] and cfg.seed == 7


def test_unknown_section_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"Valid keys under 'train\.pilot'.*micro_batch_size"):
        load_config(None, ["train.pilot.batch=3"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "l.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "l.yaml")


def test_cli_rejects_bad_config_before_anything_loads(capsys, tmp_path):
    out = tmp_path / "run"
    assert train_main(["--config", "configs/default.yaml", "train.pilot.lr=-1",
                       f"output_dir={out}"]) == 2
    assert "train.pilot.lr" in capsys.readouterr().err
    assert not out.exists()  # nothing was set up


def test_dry_run_prints_both_deepspeed_configs():
    text = dry_run(RunConfig())
    assert "# resolved config" in text and '"pilot"' in text and '"copilot"' in text
    assert '"stage": 3' in text


def test_mistake_log_cross_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"^mistake_log\.store\.lossy_keepbits: bit rounding"):
        load_config(None, ["mistake_log.storage_dtype=bfloat16",
                           "mistake_log.store.lossy_keepbits=8"])
    with pytest.raises(ConfigError, match=r"^mistake_log\.window_steps: 'all' needs"):
        load_config(None, ["mistake_log.backend=memory", "mistake_log.window_steps=all"])
    cfg = load_config(None, ["mistake_log.window_steps=all"])
    assert cfg.mistake_log.backend == "zarr" and cfg.mistake_log.window_steps == "all"


def test_extends_merges_sections_and_reports_missing_parent(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\ntrain: {steps: 7, log_every: 2}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "child.yaml", ["seed=4"])
    assert (cfg.seed, cfg.train.steps, cfg.train.log_every) == (4, 9, 2)
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*extended by"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


def test_matched_size_pilot_has_the_pilot_plus_copilot_parameter_count():
    from tcp.data.tokenizer import build_char_tokenizer
    from tcp.models.copilot import Copilot
    from tcp.models.pilot import build_llama
    from tcp.training.engines import param_count

    tok = build_char_tokenizer()
    default = load_config("configs/default.yaml")
    matched = load_config("configs/matched_size.yaml")

    def pilot(cfg):
        return param_count(build_llama(cfg.model.arch, vocab_size=len(tok), pad_id=0, bos_id=1,
                                       eos_id=2, seed=0))

    n_pilot, n_matched = pilot(default), pilot(matched)
    n_copilot = param_count(Copilot(default.copilot, vocab_size=len(tok),
                                    pilot_hidden=default.model.arch.hidden_size))
    assert abs(n_matched - (n_pilot + n_copilot)) / (n_pilot + n_copilot) < 0.005
    # Same data and budget as the default; only the Pilot's shape and the Copilot's updates differ.
    for section in ("data", "base", "eval"):
        assert getattr(matched, section) == getattr(default, section), section
    assert matched.train.pilot == default.train.pilot
    assert matched.train.steps == default.train.steps
    assert matched.train.copilot_start_step >= matched.train.steps
    assert matched.train.copilot_tail_steps == 0  # no Copilot, so no Copilot tail


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).resolve().parents[2] /
                                                        "configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0 and cfg.eval.lambdas


def test_epochs_derive_steps_and_the_schedule_counts_optimizer_steps():
    from tcp.config import resolve_epochs

    cfg = load_config(None, ["train.epochs=3", "train.steps=7", "train.pilot.micro_batch_size=4",
                             "train.pilot.grad_accum_steps=2", "train.pilot.warmup_steps=2"])
    assert resolve_epochs(cfg, num_samples=100, world_size=2).train.steps == 38  # ceil(300/8)
    assert resolve_epochs(load_config(None), num_samples=100, world_size=2).train.steps == 500
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(None, ["train.epochs=0"])
    ds = render_deepspeed(resolve_epochs(cfg, num_samples=100, world_size=2), "pilot",
                          world_size=2)
    assert ds["scheduler"]["params"]["total_num_steps"] == 19  # 38 micro steps / 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50_000_000


def test_each_section_lives_in_the_file_the_package_docstring_names():
    """The table in tcp/config/__init__.py (YAML section -> file -> dataclass) is how a
    newcomer finds a key: every section of RunConfig has a row, and the row is true."""
    import dataclasses
    import re
    import typing

    import tcp.config

    rows = {m[1]: (m[2], m[3]) for m in re.finditer(
        r"^ {4}([a-z_.]+) +(tcp/config/[a-z_]+\.py) +([A-Za-z]+)$", tcp.config.__doc__, re.M)}

    def sections(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield f"{prefix}{f.name}", tp
                yield from sections(tp, f"{prefix}{f.name}.")

    found = dict(sections(RunConfig))
    assert sorted(found) == sorted(rows)
    for key, cls in found.items():
        path, name = rows[key]
        assert (cls.__name__, cls.__module__) == (name, path[:-3].replace("/", ".")), key
    assert RunConfig.__module__ == "tcp.config.run"
