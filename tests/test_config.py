"""Recipes in nemo_configs/: the cards' hyper-parameters, overrides, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathtir.recipes import ConfigError
from mathtir.train.recipe import load_recipe, validate_parallelism

RECIPES = Path(__file__).resolve().parent.parent / "nemo_configs"


def test_stage_recipes_carry_the_cards_hyperparameters():
    s1 = load_recipe(RECIPES / "stage1_cot.yaml")
    assert (s1.optim.lr, s1.trainer.max_epochs, s1.model.global_batch_size, s1.data.seq_length) == (2e-5, 2, 96, 4096)
    assert list(s1.optim.betas) == [0.9, 0.98] and s1.optim.weight_decay == 0.1
    assert (s1.optim.sched.name, s1.optim.sched.warmup_steps, s1.trainer.precision) == ("CosineAnnealing", 20,
                                                                                         "bf16-mixed")
    # 8B on 8-GPU nodes: the layout must be valid for 1 and 2 full nodes of an 8B Llama (32 heads, 8 KV).
    for nodes in (1, 2):
        validate_parallelism(s1, world_size=8 * nodes, num_attention_heads=32, num_query_groups=8, num_layers=32)

    s2 = load_recipe(RECIPES / "stage2_tir.yaml")
    assert s2.model.global_batch_size == 64 and s2.model.init_from == s1.checkpoint.dir
    assert s2.checkpoint.dir != s1.checkpoint.dir and s2.optim.lr == s1.optim.lr

    sw = load_recipe(RECIPES / "swallow_openmath.yaml")
    assert (sw.optim.lr, sw.trainer.max_epochs, sw.model.global_batch_size, sw.data.seq_length) == (1e-6, 1, 32, 2048)
    assert sw.optim.weight_decay == 0.05 and sw.model.micro_batch_size == 2
    # 32 = 2 x 16 accumulation on one data-parallel rank (TP=2 on 2 GPUs).
    assert validate_parallelism(sw, world_size=2, num_attention_heads=32, num_query_groups=8, num_layers=32) == 1


def test_overrides_apply_with_types_and_base_chain():
    cfg = load_recipe(RECIPES / "stage2_tir_smoke.yaml",
                      ["trainer.max_steps=3", "optim.lr=0.5", "optim.betas=[0.8,0.9]", "logging.tensorboard_dir=x"])
    assert cfg.trainer.max_steps == 3 and cfg.optim.lr == 0.5 and list(cfg.optim.betas) == [0.8, 0.9]
    # inherited through stage2_tir_smoke -> stage1_cot_smoke -> stage1_cot
    assert cfg.model.tensor_model_parallel_size == 2 and cfg.optim.weight_decay == 0.1
    assert cfg.name == "stage2_tir_smoke"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_stepz=3"], r"override 'trainer.max_stepz': unknown key 'trainer.max_stepz'"),
    (["optim.lr=fast"], r"key 'optim.lr': Value 'fast'"),
    (["trainer.precision=fp16"], r"key 'trainer.precision': 'fp16' is not one of"),
    (["model.sequence_parallel=true", "model.tensor_model_parallel_size=1"], r"key 'model.sequence_parallel'"),
    (["optim.sched.min_lr=1.0"], r"key 'optim.sched.min_lr'"),
    (["optim.betas=[0.9]"], r"key 'optim.betas'"),
    (["noequals"], r"expected key=value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(RECIPES / "stage1_cot.yaml", overrides)


def test_bad_recipe_files_name_the_file_and_key(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"base: {RECIPES / 'stage1_cot.yaml'}\noptim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'optim.learning_rate'"):
        load_recipe(typo)
    missing = tmp_path / "missing.yaml"
    missing.write_text("name: x\ndata:\n  seq_length: 16\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: required key '(model.init_from|data.train_dir|checkpoint.dir)'"):
        load_recipe(missing)
    with pytest.raises(ConfigError, match=r"nope.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        load_recipe(broken)


def test_parallel_layout_errors():
    smoke = load_recipe(RECIPES / "smollm2_smoke.yaml", ["model.tensor_model_parallel_size=2",
                                                         "model.sequence_parallel=true"])
    # SmolLM2-135M: 9 heads, 3 KV heads, 30 layers.
    with pytest.raises(ConfigError, match=r"TP=2 does not divide the model's 9 attention heads"):
        validate_parallelism(smoke, world_size=2, num_attention_heads=9, num_query_groups=3, num_layers=30)
    with pytest.raises(ConfigError, match=r"TP=2 does not divide the model's 1 key/value heads"):
        validate_parallelism(smoke, world_size=2, num_attention_heads=8, num_query_groups=1, num_layers=30)
    s1 = load_recipe(RECIPES / "stage1_cot.yaml")
    with pytest.raises(ConfigError, match=r"global batch 96 is not divisible by micro batch 1 x data-parallel "
                                          r"size 64"):
        validate_parallelism(s1, world_size=128, num_attention_heads=32, num_query_groups=8, num_layers=32)
    with pytest.raises(ConfigError, match=r"does not divide the 3 launched ranks"):
        validate_parallelism(s1, world_size=3, num_attention_heads=32, num_query_groups=8, num_layers=32)
    pp = load_recipe(RECIPES / "stage1_cot.yaml", ["model.pipeline_model_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"30 layers do not split evenly over 4 pipeline stages"):
        validate_parallelism(pp, world_size=8, num_attention_heads=32, num_query_groups=8, num_layers=30)
