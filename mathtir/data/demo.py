"""SYNTHETIC demo data: Japanese arithmetic word problems with CoT and TIR solutions (not a real dataset).

Used by the local pipeline and the tests. Problems come from a few fixed templates with small numbers, so a
135M model can learn them in minutes on a CPU; every solution is short. TIR solutions are executed for real
through the sandbox (mathtir.sandbox) and their output blocks are what the code printed, laid out by
mathtir.formats.format_output exactly as the evaluation's TIR loop lays them out.

Files written to ``out``:
- ``cot_train.jsonl`` and ``tir_train.jsonl``: OpenMathReasoning-shaped (id, problem, generated_solution,
  expected_answer, inference_mode cot|tir, problem_source, category), one solution per training problem each,
  TIR in the tir dialect;
- ``openmath_train.jsonl``: OpenMathInstruct-1-shaped (question, generated_solution, expected_answer),
  openmath dialect (<llm-code>...);
- ``eval.jsonl``: held-out problems (id, problem, expected_answer, category), none of them in training;
- ``README.txt``: says that all of this is synthetic.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mathtir.similarity import normalize

SOURCE = "synthetic:mathtir-demo"
NAMES = ["たろう", "はなこ", "けんた", "さくら", "ゆうき", "みお"]
ITEMS = [("りんご", "個"), ("あめ", "個"), ("鉛筆", "本"), ("カード", "枚"), ("クッキー", "枚"), ("花", "本")]
CONTAINERS = ["箱", "袋", "皿"]
FOODS = ["パン", "おにぎり", "ドーナツ"]
DRINKS = ["ジュース", "お茶"]


@dataclass(frozen=True)
class Problem:
    category: str
    problem: str
    answer: int
    cot: str  # the reasoning sentence before the boxed answer
    code: str
    closing: tuple[str, str]  # the final sentence around the boxed answer

    def final_sentence(self) -> str:
        return f"{self.closing[0]} $\\boxed{{{self.answer}}}$ {self.closing[1]}"


def _addition(rng: random.Random) -> Problem:
    name, (item, unit), a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 30), rng.randint(2, 30)
    return Problem(
        "たし算", f"{name}さんは{item}を{a}{unit}持っています。お母さんから{b}{unit}もらいました。"
                  f"{item}は全部で何{unit}ですか。",
        a + b, f"はじめの{a}{unit}にもらった{b}{unit}をたします。{a} + {b} = {a + b}",
        f"total = {a} + {b}\nprint(total)", (f"{item}は全部で", f"{unit}です。"))


def _subtraction(rng: random.Random) -> Problem:
    name, (item, unit), b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 20)
    a = b + rng.randint(1, 30)
    return Problem(
        "ひき算", f"{name}さんは{item}を{a}{unit}持っていました。そのうち{b}{unit}を友だちにあげました。"
                  f"{item}は何{unit}残っていますか。",
        a - b, f"持っていた{a}{unit}からあげた{b}{unit}をひきます。{a} - {b} = {a - b}",
        f"left = {a} - {b}\nprint(left)", (f"{item}は", f"{unit}残っています。"))


def _multiplication(rng: random.Random) -> Problem:
    (item, unit), box, a, b = rng.choice(ITEMS), rng.choice(CONTAINERS), rng.randint(2, 12), rng.randint(2, 9)
    return Problem(
        "かけ算", f"1{box}に{item}が{a}{unit}入っています。{b}{box}では{item}は全部で何{unit}ですか。",
        a * b, f"1{box}{a}{unit}が{b}{box}分なので、かけ算をします。{a} × {b} = {a * b}",
        f"total = {a} * {b}\nprint(total)", (f"{item}は全部で", f"{unit}です。"))


def _division(rng: random.Random) -> Problem:
    name, (item, unit) = rng.choice(NAMES), rng.choice(ITEMS)
    each, people = rng.randint(2, 12), rng.randint(2, 9)
    total = each * people
    return Problem(
        "わり算", f"{name}さんは{item}を{total}{unit}持っています。{people}人で同じ数ずつ分けると、"
                  f"1人何{unit}になりますか。",
        each, f"{total}{unit}を{people}人で分けるので、わり算をします。{total} ÷ {people} = {each}",
        f"each = {total} // {people}\nprint(each)", ("1人", f"{unit}になります。"))


def _two_step(rng: random.Random) -> Problem:
    food, drink = rng.choice(FOODS), rng.choice(DRINKS)
    price, count = rng.choice([50, 60, 80, 90, 100, 120, 150]), rng.randint(2, 6)
    juice = rng.choice([90, 100, 120, 130, 150])
    total = price * count + juice
    return Problem(
        "2段階", f"1個{price}円の{food}を{count}個と、{juice}円の{drink}を1本買いました。代金は全部で何円ですか。",
        total, f"{food}の代金は {price} × {count} = {price * count} 円、{drink}とあわせて "
               f"{price * count} + {juice} = {total}",
        f"food = {price} * {count}\ntotal = food + {juice}\nprint(total)", ("代金は全部で", "円です。"))


TEMPLATES: list[Callable[[random.Random], Problem]] = [_addition, _subtraction, _multiplication, _division, _two_step]


def generate_problems(n: int, rng: random.Random, exclude: set[tuple[str, str]]) -> list[Problem]:
    """n distinct problems (by normalized text), none with the template and numbers of one in ``exclude``
    (`content_key`): a held-out problem with only its names or items swapped is still the same problem, and
    decontamination rightly catches it. The template cycles."""
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot generate {n} distinct demo problems (the templates' space is too small)")
        problem = TEMPLATES[len(problems) % len(TEMPLATES)](rng)
        key = normalize(problem.problem)
        if key not in seen and content_key(problem) not in exclude:
            seen.add(key)
            problems.append(problem)
    return problems


def content_key(p: Problem) -> tuple[str, str]:
    """What a problem asks, without its names and items: its template and the computation with its numbers."""
    return p.category, p.code


def cot_solution(p: Problem) -> str:
    return f"{p.cot}\n{p.final_sentence()}"


def tir_solution(p: Problem, output_block: str, dialect) -> str:
    """tir dialect (the competition model's layout): <think>, code, output, boxed answer."""
    if dialect.name == "tir":
        return (f"<think>\n{p.category}の問題です。Pythonで計算します。\n</think>\n"
                f"{dialect.code_block(p.code)}{output_block}{p.final_sentence()}")
    return (f"Pythonで計算しましょう。{dialect.code_block(p.code)}{output_block}"
            f"したがって、{p.final_sentence()}")


def write_demo_data(out: str | Path, *, seed: int = 0, n_train: int = 1000, n_eval: int = 100,
                    sandbox_workers: int = 2) -> dict[str, Path]:
    """Generate, execute every TIR code block in the sandbox, check its output, write the files."""
    from mathtir.formats import format_output, get_dialect
    from mathtir.sandbox import SandboxPool

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    eval_problems = generate_problems(n_eval, rng, exclude=set())
    train_problems = generate_problems(n_train, rng, exclude={content_key(p) for p in eval_problems})
    tir, openmath = get_dialect("tir"), get_dialect("openmath")
    with SandboxPool(sandbox_workers) as pool, ThreadPoolExecutor(sandbox_workers) as executor:
        results = list(executor.map(lambda p: pool.run(p.code, timeout=10.0), train_problems))
    for p, result in zip(train_problems, results, strict=True):
        if result.status != "ok" or result.stdout.strip() != str(p.answer):
            raise RuntimeError(f"demo code for {p.problem!r} printed {result.stdout!r} ({result.status}: "
                               f"{result.error}), expected {p.answer}")

    paths = {name: out / f"{name}.jsonl" for name in ("cot_train", "tir_train", "openmath_train", "eval")}
    with open(paths["cot_train"], "w", encoding="utf-8") as cot, open(paths["tir_train"], "w", encoding="utf-8") as tr:
        for i, (p, result) in enumerate(zip(train_problems, results, strict=True)):
            common = {"problem": p.problem, "expected_answer": str(p.answer), "problem_source": SOURCE,
                      "category": p.category}
            cot.write(json.dumps({"id": f"demo-train-{i:05d}-cot", **common, "inference_mode": "cot",
                                  "generated_solution": cot_solution(p)}, ensure_ascii=False) + "\n")
            tr.write(json.dumps({"id": f"demo-train-{i:05d}-tir", **common, "inference_mode": "tir",
                                 "generated_solution": tir_solution(p, format_output(result, tir), tir)},
                                ensure_ascii=False) + "\n")
    with open(paths["openmath_train"], "w", encoding="utf-8") as f:
        for p, result in zip(train_problems, results, strict=True):
            f.write(json.dumps({"question": p.problem, "expected_answer": str(p.answer), "dataset": SOURCE,
                                "generated_solution": tir_solution(p, format_output(result, openmath), openmath)},
                               ensure_ascii=False) + "\n")
    with open(paths["eval"], "w", encoding="utf-8") as f:
        for i, p in enumerate(eval_problems):
            f.write(json.dumps({"id": f"demo-eval-{i:04d}", "problem": p.problem, "expected_answer": str(p.answer),
                                "category": p.category, "problem_source": SOURCE}, ensure_ascii=False) + "\n")
    readme = out / "README.txt"
    readme.write_text(
        "SYNTHETIC DATA generated by `python -m mathtir.data demo` (mathtir/data/demo.py), seed "
        f"{seed}: {n_train} training problems (cot_train.jsonl, tir_train.jsonl: one CoT and one TIR solution "
        f"each; openmath_train.jsonl: openmath dialect) and {n_eval} held-out problems (eval.jsonl).\n"
        "Japanese arithmetic word problems from a few templates; TIR outputs were produced by running the code\n"
        "in the mathtir sandbox. Not a benchmark; for the demo pipeline and tests only.\n", encoding="utf-8")
    paths["readme"] = readme
    return paths
