"""A prompt template that is unknown, or that the tokenizer cannot serve, is refused naming the option or
recipe key (exit 2), in data preparation and in evaluation alike; never a bare ValueError traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mathtir.data.cli import main as data_cli
from mathtir.eval.job import main as eval_main
from mathtir.megatron.checkpoint import copy_tokenizer_files


@pytest.fixture()
def tokenizer_without_chat_template(tmp_path, smollm2_hf_dir) -> Path:
    """SmolLM2's config and tokenizer with its chat template taken out (as a base model's tokenizer has none)."""
    out = tmp_path / "no_chat_template"
    copy_tokenizer_files(smollm2_hf_dir, out)
    shutil.copy(smollm2_hf_dir / "config.json", out / "config.json")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _data_recipe(tmp_path: Path, tokenizer: Path) -> Path:
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"problem": "1+1は?", "generated_solution": "\\boxed{2}", "expected_answer": "2", "category": "arith"})
                    + "\n", encoding="utf-8")
    recipe = tmp_path / "data.yaml"
    recipe.write_text(f"name: t\ninputs: [{data}]\noutput_dir: {tmp_path / 'out'}\ntokenizer: {tokenizer}\n"
                      "workers: 1\n")
    return recipe


def test_data_prepare_names_template_name(tmp_path, tokenizer_without_chat_template, capsys):
    recipe = _data_recipe(tmp_path, tokenizer_without_chat_template)
    assert data_cli(["prepare", str(recipe), "template.name=llmjpp"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: key 'template.name': 'llmjpp' is not one of" in err and "Traceback" not in err

    assert data_cli(["prepare", str(recipe), "template.name=chat"]) == 2
    err = capsys.readouterr().err
    assert "key 'template.name': template 'chat' needs a tokenizer with a chat_template" in err, err
    assert str(tokenizer_without_chat_template) in err and not (tmp_path / "out" / "manifest.json").exists()


def test_eval_run_names_prompt_template(tmp_path, tokenizer_without_chat_template, capsys):
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"id": "p1", "problem": "1+1は?", "expected_answer": "2", "category": "arith"}) + "\n", encoding="utf-8")
    common = ["--model", str(tokenizer_without_chat_template), "--data", str(data), "--output", str(tmp_path / "ev")]
    with pytest.raises(SystemExit) as exit_info:
        eval_main([*common, "--prompt-template", "llmjpp"])
    assert exit_info.value.code == 2 and "argument --prompt-template: invalid choice: 'llmjpp'" in capsys.readouterr().err

    assert eval_main([*common, "--prompt-template", "chat"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-template chat: template 'chat' needs a tokenizer with a chat_template" in err, err
    assert str(tokenizer_without_chat_template) in err
