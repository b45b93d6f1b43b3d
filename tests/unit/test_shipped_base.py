"""The base models that ship with tcp (tcp/assets/base/<key>/) are the ones the built-in configs
need, so a fresh clone of them never pre-trains; and the cache lives where the docs say."""

from pathlib import Path

import pytest

from tcp.config import load_config
from tcp.runtime.user_cache import cache_root
from tcp.training.base_phase import SHIPPED, base_dir, base_key, find_base_model
from tcp.training.build import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SHIPS = ["default", "multistep"]
"""Configs whose base model ships (configs/<name>.yaml). The yes/no and choice families have
base models of their own, pre-trained on first use (not shipped yet)."""


def _key(name: str) -> str:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    return base_key(cfg, load_tokenizer(cfg))


@pytest.mark.parametrize("name", SHIPS)
def test_config_base_model_ships(name):
    key = _key(name)
    assert (SHIPPED / key / "config.json").is_file() and \
        (SHIPPED / key / "model.safetensors").is_file(), (
        f"configs/{name}.yaml needs base model {key}, which does not ship (its base.* or "
        f"model.arch changed); regenerate it with: deepspeed --num_gpus 2 tools/ship_base.py "
        f"--config configs/{name}.yaml")


def test_no_stale_shipped_model():
    wanted = {_key(name) for name in SHIPS}
    stale = sorted(p.name for p in SHIPPED.iterdir() if p.is_dir() and p.name not in wanted)
    assert not stale, f"tcp/assets/base/ holds models no config needs: git rm -r {stale}"


def test_default_finds_the_shipped_model_with_an_empty_cache():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    tok = load_tokenizer(cfg)
    assert not base_dir(cfg, tok).exists()  # the tests' own cache (tests/conftest.py)
    assert find_base_model(cfg, tok) == SHIPPED / base_key(cfg, tok)
    changed = load_config(ROOT / "configs" / "default.yaml", ["base.steps=10"])
    assert find_base_model(changed, tok) is None  # another base.*: pre-trained, not shipped


def test_shipped_model_found_before_the_cache_and_the_cache_otherwise(tmp_path):
    for overrides in ([], ["base.steps=10"]):
        cfg = load_config(ROOT / "configs" / "default.yaml", [f"base.cache_dir={tmp_path}",
                                                              *overrides])
        tok = load_tokenizer(cfg)
        (tmp_path / base_key(cfg, tok)).mkdir()
        (tmp_path / base_key(cfg, tok) / "config.json").write_text("{}")
        shipped = SHIPPED / base_key(cfg, tok)
        assert find_base_model(cfg, tok) == (shipped if shipped.is_dir() else
                                             tmp_path / base_key(cfg, tok))
    assert find_base_model(cfg, tok) == tmp_path / base_key(cfg, tok)  # base.steps=10: cached


def test_cache_root_follows_the_environment(tmp_path):
    assert cache_root({"TCP_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "tcp"
    assert cache_root({}) == Path("~/.cache/tcp").expanduser()
    assert cache_root({"TCP_CACHE_DIR": "", "XDG_CACHE_HOME": ""}) == \
        Path("~/.cache/tcp").expanduser()
