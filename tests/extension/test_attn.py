"""The GPU profile's attention fallback: flash-attn missing or broken -> sdpa and one line; otherwise untouched."""

import importlib
import importlib.util
import sys

import pytest
from omegaconf import OmegaConf

from tbrm_verl.attn import apply_attn_fallback, install_valuehead_loader
from tbrm_verl.config import ConfigError, compose, finish_config

ACTOR = "actor_rollout_ref.model.override_config.attn_implementation"
CRITIC = "critic.model.override_config.attn_implementation"
INSTALL = "install it with: pip install flash-attn==2.8.3 --no-build-isolation"


@pytest.fixture
def no_flash_attn(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "flash_attn" else real(name, *a, **k))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)


def _fake_flash_attn(tmp_path, monkeypatch, body: str) -> None:
    """A real `flash_attn` package on sys.path whose import runs `body`."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    importlib.invalidate_caches()


def test_missing_flash_attn_switches_actor_ref_and_critic_to_sdpa_with_one_line(no_flash_attn, capsys):
    cfg = compose(["profile=gpu", "method=ppo"])  # PPO: the critic is built too
    assert OmegaConf.select(cfg, ACTOR) is None and OmegaConf.select(cfg, CRITIC) is None  # verl's default: flash
    capsys.readouterr()
    assert apply_attn_fallback(cfg) == ["actor_rollout_ref.model", "critic.model"]
    assert OmegaConf.select(cfg, ACTOR) == "sdpa" and OmegaConf.select(cfg, CRITIC) == "sdpa"
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == ("[tbrm_verl] flash-attn is not importable (not installed): using attn_implementation=sdpa; "
                       + INSTALL + "\n")
    assert apply_attn_fallback(cfg) == [] and capsys.readouterr().err == ""  # idempotent, silent the second time


def test_broken_flash_attn_build_is_caught_and_named(tmp_path, monkeypatch, capsys):
    msg = "flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"
    _fake_flash_attn(tmp_path, monkeypatch, f"raise ImportError({msg!r})\n")
    cfg = compose(["profile=gpu", f"+{ACTOR}=flash_attention_2"])  # explicit flash_attention_2: same as the default
    capsys.readouterr()
    apply_attn_fallback(cfg)
    assert OmegaConf.select(cfg, ACTOR) == "sdpa"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"(ImportError: {msg}): using attn_implementation=sdpa; {INSTALL}" in err


def test_importable_flash_attn_leaves_the_config_alone(tmp_path, monkeypatch, capsys):
    _fake_flash_attn(tmp_path, monkeypatch, "")
    cfg = compose(["profile=gpu", "method=ppo"])
    before = OmegaConf.to_container(cfg)
    capsys.readouterr()
    assert apply_attn_fallback(cfg) == []
    assert OmegaConf.to_container(cfg) == before and capsys.readouterr().err == ""


def test_explicit_sdpa_and_cpu_profile_are_untouched(no_flash_attn, capsys):
    cfg = compose(["profile=gpu", "method=ppo", f"+{ACTOR}=sdpa", f"+{CRITIC}=sdpa"])
    capsys.readouterr()
    assert apply_attn_fallback(cfg) == [] and capsys.readouterr().err == ""
    # only the section still asking for flash_attention_2 is switched
    cfg = compose(["profile=gpu", "method=ppo", f"+{ACTOR}=eager"])
    assert apply_attn_fallback(cfg) == ["critic.model"]
    assert OmegaConf.select(cfg, ACTOR) == "eager" and OmegaConf.select(cfg, CRITIC) == "sdpa"
    # CPU profile (trainer.device=cpu): never touched, even when a section asks for flash_attention_2
    cpu = compose(["profile=cpu", f"{ACTOR}=flash_attention_2"])
    capsys.readouterr()
    assert apply_attn_fallback(cpu) == [] and OmegaConf.select(cpu, ACTOR) == "flash_attention_2"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("overrides, key", [
    (["method=grpo", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"],
     "actor_rollout_ref.actor.ulysses_sequence_parallel_size"),
    (["method=ppo", "critic.ulysses_sequence_parallel_size=2"], "critic.ulysses_sequence_parallel_size"),
])
def test_ulysses_without_flash_attn_is_a_one_line_config_error(no_flash_attn, overrides, key):
    cfg = compose(["profile=gpu", *overrides])
    with pytest.raises(ConfigError) as err:
        apply_attn_fallback(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{key}=2: ") and "flash-attn" in msg and msg.endswith(f"set {key}=1") and "\n" not in msg


def test_unused_critic_sequence_parallel_setting_is_ignored(no_flash_attn, capsys):
    cfg = compose(["profile=gpu", "method=grpo", "critic.ulysses_sequence_parallel_size=2"])  # GRPO: no critic
    apply_attn_fallback(cfg)
    assert OmegaConf.select(cfg, ACTOR) == "sdpa"


def test_finish_config_applies_the_fallback(no_flash_attn, tmp_path, capsys):
    cfg = compose(["profile=gpu", f"actor_rollout_ref.model.path={tmp_path}/model",
                   f"data.train_files={tmp_path}/t.parquet", f"data.val_files={tmp_path}/v.parquet"])
    cfg = finish_config(cfg)
    assert OmegaConf.select(cfg, ACTOR) == "sdpa"
    assert "flash-attn is not importable" in capsys.readouterr().err


def _tiny_checkpoint(path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return config


def test_critic_loader_uses_the_configured_attention(tmp_path, monkeypatch):
    import torch
    import verl.utils.model as verl_model
    from transformers import AutoConfig, Qwen2ForTokenClassification

    calls = []

    def verl_loader(*args):
        calls.append(args)
        return "verl's loader"

    monkeypatch.setattr(verl_model, "load_valuehead_model", verl_loader)
    install_valuehead_loader()
    loader = verl_model.load_valuehead_model
    assert loader is not verl_loader
    install_valuehead_loader()
    assert verl_model.load_valuehead_model is loader  # installed once

    _tiny_checkpoint(tmp_path)
    flash = AutoConfig.from_pretrained(tmp_path)
    flash._attn_implementation = "flash_attention_2"
    assert loader(str(tmp_path), torch.float32, flash, False) == "verl's loader"  # GPU default: verl's own code
    assert calls == [(str(tmp_path), torch.float32, flash, False)]

    sdpa = AutoConfig.from_pretrained(tmp_path, attn_implementation="sdpa")
    sdpa.num_labels = 1  # as verl's engine sets it for a value model
    model = loader(str(tmp_path), torch.float32, sdpa, False)
    assert isinstance(model, Qwen2ForTokenClassification) and model.config._attn_implementation == "sdpa"
    assert model.score.out_features == 1 and len(calls) == 1


def test_critic_loader_leaves_the_cpu_platforms_loader_in_place(monkeypatch):
    import verl.utils.model as verl_model

    def cpu_loader(*args):
        return None

    cpu_loader._tbrm_cpu = True
    monkeypatch.setattr(verl_model, "load_valuehead_model", cpu_loader)
    install_valuehead_loader()
    assert verl_model.load_valuehead_model is cpu_loader
