"""Execution verification through the real sandbox, and the synthetic demo data whose code really runs."""

from __future__ import annotations

import json
from pathlib import Path

from mathtir.data.demo import write_demo_data
from mathtir.data.prepare import prepare
from mathtir.data.recipe import load_data_recipe
from mathtir.data.verify import outputs_match
from mathtir.shards import PackedDataset

REPO = Path(__file__).resolve().parent.parent


def test_outputs_match_normalizes_whitespace_and_tolerates_float_printing():
    assert outputs_match("12\n", "  12", 1e-6)
    assert outputs_match("[1, 2]\n x = 0.3333333333", "[1,   2]\nx = 0.33333333333333", 1e-6)
    assert outputs_match("1e-3 done", "0.001 done", 1e-9)
    assert not outputs_match("12", "13", 1e-6)
    assert not outputs_match("0.333", "0.3333333", 1e-6)
    assert not outputs_match("x = 1", "y = 1", 1e-6)
    assert not outputs_match("1 2", "1 2 3", 1e-6)


def _tir(blocks: list[tuple[str, str]], answer: str) -> str:
    body = "".join(f"```python\n{code}\n```\n```output\n{out}\n```\n" for code, out in blocks)
    return f"<think>\n計算します。\n</think>\n{body}答えは $\\boxed{{{answer}}}$"


SAMPLES = [  # (response, expected drop reason or None)
    (_tir([("x = 6 * 7\nprint(x)", "42"), ("print(x + 1)", "43")], "43"), None),  # 2nd block needs the 1st's state
    (_tir([("print(sum(range(1, 101)))", "5050")], "5050"), None),
    (_tir([("print(1 / 3)", "0.333333333333")], "1/3"), None),  # float printed with fewer digits
    (_tir([("x = 6 * 7\nprint(x)", "42"), ("print(x * 2)", "85")], "85"), "verify_mismatch"),  # planted wrong output
    (_tir([("print(undefined_name)", "7")], "7"), "verify_error"),
    (_tir([("while True:\n    pass", "1")], "1"), "verify_timeout"),
]


def test_verification_drops_planted_wrong_output_errors_and_timeouts(tmp_path, smollm2_hf_dir):
    data = tmp_path / "tir.jsonl"
    data.write_text("".join(json.dumps({"problem": f"問題{i}", "generated_solution": response,
                                        "expected_answer": response.rsplit("boxed{", 1)[1].split("}")[0]},
                                       ensure_ascii=False) + "\n" for i, (response, _) in enumerate(SAMPLES)))
    cfg = load_data_recipe(REPO / "nemo_configs" / "data_demo_tir.yaml", [
        f"inputs=[{data}]", f"output_dir={tmp_path / 'out'}", f"tokenizer={smollm2_hf_dir}", "fields.mode=null",
        "filters.modes=null", "decontam.eval_sets=[]", "verify.timeout_s=2", "workers=1"])
    manifest = prepare(cfg)
    dropped = {json.loads(line)["index"]: json.loads(line)
               for line in (Path(cfg.output_dir) / "dropped.jsonl").read_text().splitlines()}
    assert {i: d["reason"] for i, d in dropped.items()} == {i: r for i, (_, r) in enumerate(SAMPLES) if r}
    assert "code block 1" in dropped[3]["detail"] and "'85'" in dropped[3]["detail"]
    v = manifest["verification"]
    assert v["samples_checked"] == len(SAMPLES) and v["failed"] == 3
    assert v["by_reason"]["mismatch"] == v["by_reason"]["error"] == v["by_reason"]["timeout"] == 1
    assert manifest["counts"]["packed_documents"] == 3
    assert "Execution verification" in (Path(cfg.output_dir) / "report.md").read_text()


def test_demo_data_is_synthetic_correct_and_prepares_cleanly(tmp_path, smollm2_hf_dir):
    paths = write_demo_data(tmp_path / "raw", seed=3, n_train=40, n_eval=10, sandbox_workers=2)
    assert "SYNTHETIC" in paths["readme"].read_text()
    tir = [json.loads(line) for line in paths["tir_train"].read_text().splitlines()]
    cot = [json.loads(line) for line in paths["cot_train"].read_text().splitlines()]
    held_out = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    assert len(tir) == len(cot) == 40 and len(held_out) == 10
    assert set(held_out[0]) >= {"id", "problem", "expected_answer", "category"}
    assert not {r["problem"] for r in held_out} & {r["problem"] for r in tir}
    for record in tir:  # the recorded output is what the code printed, and it is the answer
        assert record["problem_source"].startswith("synthetic")
        assert f"```output\n{record['expected_answer']}\n```" in record["generated_solution"]
    overrides = lambda name: [f"inputs=[{paths[name]}]", f"output_dir={tmp_path / name}",  # noqa: E731
                              f"tokenizer={smollm2_hf_dir}", f"decontam.eval_sets=[{paths['eval']}]", "workers=1"]
    for recipe, name in (("data_demo_tir.yaml", "tir_train"), ("data_demo_cot.yaml", "cot_train")):
        manifest = prepare(load_data_recipe(REPO / "nemo_configs" / recipe, overrides(name)))
        assert manifest["counts"]["packed_documents"] == 40, manifest["counts"]
        assert len(PackedDataset(tmp_path / name)) == manifest["tokens"]["sequences"]
    assert manifest["verification"] is None
    tir_manifest = json.loads((tmp_path / "tir_train" / "manifest.json").read_text())
    assert tir_manifest["verification"]["samples_checked"] == 40 and tir_manifest["verification"]["failed"] == 0
    # A held-out problem planted into the training data is caught.
    planted = tmp_path / "planted.jsonl"
    planted.write_text(paths["tir_train"].read_text() + json.dumps(
        {**tir[0], "problem": held_out[0]["problem"], "expected_answer": tir[0]["expected_answer"]},
        ensure_ascii=False) + "\n")
    cfg = load_data_recipe(REPO / "nemo_configs" / "data_demo_tir.yaml",
                           [*overrides("tir_train")[1:], f"inputs=[{planted}]", f"output_dir={tmp_path / 'planted'}",
                            "verify.enabled=false"])
    assert prepare(cfg)["counts"]["contaminated"] == 1


def test_demo_openmath_dialect_file_prepares(tmp_path, smollm2_hf_dir):
    paths = write_demo_data(tmp_path / "raw", seed=4, n_train=10, n_eval=2, sandbox_workers=1)
    cfg = load_data_recipe(REPO / "nemo_configs" / "data_openmathinstruct.yaml", [
        f"inputs=[{paths['openmath_train']}]", f"output_dir={tmp_path / 'om'}", f"tokenizer={smollm2_hf_dir}",
        "template.name=chatml", "seq_length=1024", "verify.workers=1", "workers=1"])
    manifest = prepare(cfg)
    assert manifest["counts"]["packed_documents"] == 10 and manifest["verification"]["failed"] == 0
