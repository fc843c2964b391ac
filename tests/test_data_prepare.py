"""`mathtir data prepare` end to end on an OpenMathReasoning-shaped file with the real SmolLM2
tokenizer: every cleaning step counted and listed, shards the loader reads back to the exact texts, bad input
named by file/line/field, and byte-identical shards for the same seed (also through array-job parts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mathtir.data.cli import main as cli
from mathtir.data.merge import merge
from mathtir.data.part import prepare_part
from mathtir.data.prepare import prepare
from mathtir.data.recipe import load_data_recipe
from mathtir.formats import get_template
from mathtir.readers import DataError
from mathtir.shards import PackedDataset

EVAL = [{"id": "e1", "problem": "箱に赤い玉が7個と白い玉が5個入っています。玉は全部で何個ですか。", "expected_answer": "12"}]


def _tir(code: str, output: str, answer: str) -> str:
    return f"<think>\n計算します。\n</think>\n```python\n{code}\n```\n```output\n{output}\n```\n答えは $\\boxed{{{answer}}}$ です。"


def _rows() -> list[dict]:
    rows = []
    for i in range(24):  # kept: distinct CoT and TIR samples
        a, b = i + 2, 2 * i + 3
        rows.append({"problem": f"{a}と{b}の和を求めよ。", "generated_solution": f"{a} + {b} = {a + b}。答えは \\boxed{{{a + b}}}",
                     "expected_answer": str(a + b), "inference_mode": "cot"})
        rows.append({"problem": f"{a}と{b}の積を求めよ。", "generated_solution": _tir(f"print({a} * {b})", str(a * b), str(a * b)),
                     "expected_answer": str(a * b), "inference_mode": "tir"})
    rows += [
        dict(rows[0]),  # exact duplicate
        {**rows[2], "generated_solution": rows[2]["generated_solution"].replace(" + ", "  +  ")},  # duplicate after normalization
        {"problem": "3と4の和", "generated_solution": "答えは \\boxed{8}", "expected_answer": "7", "inference_mode": "cot"},
        {"problem": "3と5の和", "generated_solution": "答えは 8", "expected_answer": "8", "inference_mode": "cot"},
        {"problem": "6と7の積", "generated_solution": "\\boxed{42} まず計算。\n```python\nprint(6*7)\n```\n```output\n42\n```\n\\boxed{42}",
         "expected_answer": "42", "inference_mode": "tir"},
        {"problem": "8と9の積", "generated_solution": "```python\nprint(8*9)\n```\n答えは \\boxed{72}", "expected_answer": "72",
         "inference_mode": "tir"},
        {"problem": "考える", "generated_solution": "x" * 3000 + " \\boxed{1}", "expected_answer": "1", "inference_mode": "cot"},
        {"problem": "選ぶ", "generated_solution": "\\boxed{1}", "expected_answer": "1", "inference_mode": "genselect"},
        # the evaluation problem, planted with a different lead-in and full-width digits
        {"problem": "次の問題を解け。箱に赤い玉が７個と白い玉が５個入っています。玉は全部で何個ですか。",
         "generated_solution": "7 + 5 = 12。\\boxed{12}", "expected_answer": "12", "inference_mode": "cot"},
    ]
    return rows


EXPECTED_DROPS = {"exact_duplicate": 2, "wrong_answer": 1, "no_answer": 1, "boxed_before_code": 1,
                  "code_without_output": 1, "over_length": 1, "mode_not_selected": 1, "contaminated": 1}


@pytest.fixture()
def recipe(tmp_path, smollm2_hf_dir):
    data = tmp_path / "omr.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()), encoding="utf-8")
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EVAL), encoding="utf-8")
    config = tmp_path / "data.yaml"
    config.write_text(f"""
name: test
inputs: [{data}]
output_dir: {tmp_path / "out"}
tokenizer: {smollm2_hf_dir}
seq_length: 512
workers: 1
batch_size: 8
template: {{name: llmjp}}
dialect: tir
fields: {{mode: inference_mode}}
filters: {{modes: [cot, tir]}}
decontam: {{eval_sets: [{eval_set}], ngram: 8, min_overlap: 0.8}}
pack: {{rows_per_shard: 4, row_group_size: 2}}
""")
    return config


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.parquet"))}


def test_prepare_counts_every_step_and_shards_hold_the_exact_texts(recipe, smollm2_hf_dir, capsys):
    assert cli(["prepare", str(recipe)]) == 0
    assert "| exact duplicate | 2 |" in capsys.readouterr().out
    cfg = load_data_recipe(recipe)
    out = Path(cfg.output_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    rows = _rows()
    assert counts["records_read"] == len(rows)
    assert {k: v for k, v in counts.items() if v and k not in ("records_read", "packed_documents")} == EXPECTED_DROPS
    assert counts["packed_documents"] == len(rows) - sum(EXPECTED_DROPS.values()) == 48
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == sum(EXPECTED_DROPS.values())
    contaminated = next(d for d in dropped if d["reason"] == "contaminated")
    assert contaminated["location"] == f"{cfg.inputs[0]}:{len(rows)}" and "eval.jsonl:e1" in contaminated["detail"]
    assert manifest["sources"][0]["files"][0]["sha256"] and manifest["tokenizer"]["vocab_size"] == 49152

    # The loader gives back every kept document's exact text; the loss covers its response + eos only.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    template = get_template("llmjp", tokenizer=tokenizer)
    kept = {(r["problem"], r["generated_solution"]) for r in rows[:48]}
    ds = PackedDataset(out)
    assert len(ds) == manifest["tokens"]["sequences"] and ds.seq_length == 512
    found = set()
    trained_total = 0
    for i in range(len(ds)):
        row = ds[i]
        offsets = row["doc_offsets"].tolist()
        for start, end in zip(offsets[:-1], offsets[1:], strict=True):
            text = tokenizer.decode(row["tokens"][start:end])
            prompt_end = text.index("### 応答:\n") + len("### 応答:\n")
            problem = text[len(template.prefix):prompt_end - len(template.suffix)]
            response = text[prompt_end:-len(template.eos)]
            assert text.endswith(template.eos)
            found.add((problem, response))
            predicted = row["labels"][start:end][row["loss_mask"][start:end].bool()]
            assert tokenizer.decode(predicted) == response + template.eos
            trained_total += int(row["loss_mask"][start:end].sum())
        assert row["loss_mask"][offsets[-1] - 1:].sum() == 0
    assert found == kept
    assert trained_total == manifest["tokens"]["trained"]
    assert manifest["tokens"]["fill"] == pytest.approx(
        manifest["tokens"]["documents"] / (len(ds) * 512))
    report = (out / "report.md").read_text()
    for reason in EXPECTED_DROPS:
        assert reason.replace("_", " ") in report
    assert manifest["decontamination"]["hits"] == [{"location": contaminated["location"], "eval_set": "eval.jsonl",
                                                    "eval_id": "e1", "overlap": 1.0, "kind": "ngram", "score": 1.0}]
    assert manifest["decontamination"]["by_kind"] == {"ngram": 1}
    assert f"| {contaminated['location']} | eval.jsonl:e1 | ngram | 1.00 | 1.00 |" in report


def test_same_seed_gives_byte_identical_shards_also_through_array_parts(recipe, tmp_path):
    cfg = load_data_recipe(recipe, ["workers=2"])
    prepare(cfg)
    first = _shard_bytes(Path(cfg.output_dir))
    assert len(first) >= 2
    again = load_data_recipe(recipe, [f"output_dir={tmp_path / 'again'}"])
    prepare(again)
    assert _shard_bytes(Path(again.output_dir)) == first
    parts = load_data_recipe(recipe, [f"output_dir={tmp_path / 'parts'}"])
    for part in range(3):
        prepare_part(parts, part, 3)
    merge(parts, 3)
    assert _shard_bytes(Path(parts.output_dir)) == first
    manifest = json.loads((Path(parts.output_dir) / "manifest.json").read_text())
    assert manifest["counts"]["packed_documents"] == 48 and manifest["num_parts"] == 3
    other_seed = load_data_recipe(recipe, [f"output_dir={tmp_path / 'seed2'}", "seed=2"])
    prepare(other_seed)
    assert _shard_bytes(Path(other_seed.output_dir)) != first


def test_merge_refuses_missing_or_stale_parts(recipe, tmp_path):
    cfg = load_data_recipe(recipe, [f"output_dir={tmp_path / 'p'}"])
    prepare_part(cfg, 0, 2)
    with pytest.raises(DataError, match=r"part 1 of 2 is not done"):
        merge(cfg, 2)
    prepare_part(cfg, 1, 2)
    with pytest.raises(DataError, match=r"part 0 was prepared with another config"):
        merge(load_data_recipe(recipe, [f"output_dir={tmp_path / 'p'}", "seq_length=256"]), 2)


BAD_INPUTS = [
    (b'{"problem": "a", "generated_solution": "b", "expected_answer": "1", "inference_mode": "cot"}\n{"problem": ',
     r"bad\.jsonl:2: malformed JSON"),
    (b'{"problem": "a", "expected_answer": "1", "inference_mode": "cot"}\n',
     r"bad\.jsonl:1: field 'generated_solution': missing"),
    (b'{"problem": "\xe3\x81", "generated_solution": "b", "expected_answer": "1", "inference_mode": "cot"}\n',
     r"bad\.jsonl:1: non-UTF-8 byte 0xe3"),
    (b"", r"bad\.jsonl: empty file"),
    # The parser's recursion limit: a traceback before, so skip_invalid could not skip it.
    (b"[" * 200_000 + b"]" * 200_000 + b"\n", r"bad\.jsonl:1: JSON nested too deeply"),
]


@pytest.mark.parametrize(("content", "message"), BAD_INPUTS, ids=["json", "field", "utf8", "empty", "deep"])
def test_bad_input_is_an_error_naming_file_line_and_field_unless_skipped(recipe, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    good = load_data_recipe(recipe).inputs[0]
    assert cli(["prepare", str(recipe), f"inputs=[{good},{bad}]"]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DataError, match=message):
        prepare(load_data_recipe(recipe, [f"inputs=[{good},{bad}]"]))
    cfg = load_data_recipe(recipe, [f"inputs=[{good},{bad}]", "skip_invalid=true"])
    manifest = prepare(cfg)
    assert manifest["counts"]["invalid"] == 1 and manifest["counts"]["packed_documents"] == 48
    dropped = [json.loads(line) for line in (Path(cfg.output_dir) / "dropped.jsonl").read_text().splitlines()]
    (invalid,) = [d for d in dropped if d["reason"] == "invalid"]
    assert invalid["detail"].startswith(str(bad))


def test_train_on_outputs_false_masks_output_blocks(recipe, smollm2_hf_dir, tmp_path):
    cfg = load_data_recipe(recipe, [f"output_dir={tmp_path / 'masked'}", "train_on_outputs=false",
                                    "filters.modes=[tir]"])
    prepare(cfg)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    ds = PackedDataset(cfg.output_dir)
    row = ds[0]
    trained_text = tokenizer.decode(row["labels"][row["loss_mask"].bool()])
    all_text = tokenizer.decode(row["tokens"][: row["doc_offsets"][-1]])
    assert "```python" in trained_text and "```output" in all_text and "```output" not in trained_text
    assert torch.all(row["loss_mask"][row["doc_offsets"][-1] - 1:] == 0)


def test_near_duplicates_are_removed_only_when_enabled(recipe, tmp_path):
    steps = "".join(f"ステップ{k}: 左辺と右辺を比べ、{k}を代入して式を整理する。" for k in range(30))
    rows = [{"problem": "長い問題", "generated_solution": f"{steps}答えは \\boxed{{5}}", "expected_answer": "5"},
            {"problem": "長い問題", "generated_solution": f"{steps.replace('比べ', '比較し', 1)}答えは \\boxed{{5}}",
             "expected_answer": "5"},
            {"problem": "別の問題", "generated_solution": "全く違う解き方で 2 + 3 = 5。答えは \\boxed{5}", "expected_answer": "5"}]
    data = tmp_path / "near.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    common = [f"inputs=[{data}]", "fields.mode=null", "filters.modes=null", "seq_length=2048"]
    off = prepare(load_data_recipe(recipe, [*common, f"output_dir={tmp_path / 'off'}"]))
    assert off["counts"]["packed_documents"] == 3 and off["counts"]["near_duplicate"] == 0
    on = prepare(load_data_recipe(recipe, [*common, f"output_dir={tmp_path / 'on'}", "dedup.near=true"]))
    assert on["counts"]["near_duplicate"] == 1 and on["counts"]["packed_documents"] == 2
    (entry,) = [json.loads(line) for line in (tmp_path / "on" / "dropped.jsonl").read_text().splitlines()]
    assert entry["index"] == 1 and entry["detail"] == f"near duplicate of {data}:1"


def test_trained_token_span_matches_offsets_with_added_special_tokens(smollm2_hf_dir):
    """The span search agrees with the per-token offsets definition, also when the tokenizer adds BOS/EOS."""
    import random

    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    from mathtir.data.process import _tokens_starting_in

    tokenizer = Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json"))
    tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A <|endoftext|>", special_tokens=[
        ("<|im_start|>", tokenizer.token_to_id("<|im_start|>")), ("<|endoftext|>", tokenizer.token_to_id("<|endoftext|>"))])
    texts = ["### 応答:\n答えは𝑥=３です😀😀。<|im_end|>", "abc def\n```output\n12\n```\n終わり😀", "日本語😀中😀 x"]
    rng = random.Random(0)
    for text in texts * 40:
        encoding = tokenizer.encode(text)
        a = rng.randint(1, len(text) - 1)
        b = rng.choice([rng.randint(a + 1, len(text)), len(text)])
        expected = [i for i, (s, e) in enumerate(encoding.offsets) if a <= s < b and e > s]
        first, last = _tokens_starting_in(encoding, a, b, len(text))
        assert list(range(first, last)) == expected, (text, a, b)
