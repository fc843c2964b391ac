"""TIR training data by rejection sampling: a teacher samples code-interleaved solutions through the evaluation's
own machinery (backends, sandbox, TIR loop, grader), and only those that reach the known answer are kept.

Entry points: ``mathtir generate ...`` and ``ray_eval/generate.py`` (``ray job submit --working-dir . -- python
ray_eval/generate.py ...``); Ray as for evaluation (RAY_ADDRESS, else an embedded Ray on loopback).

Sized for runs evaluation never reaches (500k problems x 8 samples): the problems are checked whole but not
held, then read again in shards of --shard-problems as the run reaches them; samples are drawn shard by shard
through a window of --max-in-flight trajectories, and a shard whose samples are all recorded is *sealed*: its
solutions and per-problem figures are written, its line appended to index.jsonl, and its problems and records
leave memory. Resume reads the index, then only the records of the
few shards that were open. Output directory:

    manifest.json                 model, data + sha256, arguments, code revision, one entry per attempt
    records/shard-NNNNNN.jsonl    every sample (as evaluation records them), appended at once
    solutions/part-NNNNNN.jsonl   the kept solutions, OpenMathReasoning-shaped: `mathtir data prepare` input
    problems/shard-NNNNNN.jsonl   per problem: the teacher's pass rate, kept count, why the others were dropped
    index.jsonl                   one line per sealed shard (its totals and file hashes)
    summary.json, report.md       totals, per category, drop reasons, pass-rate histogram, throughput
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

from mathtir.eval.job import (
    IDENTITY_ARGS,
    MANIFEST_FILE,
    JobError,
    add_sampling_arguments,
    check_args,
    init_ray,
    model_tokenizer,
    prepare_manifest,
    run_job,
    run_samples,
    start_samplers,
)
from mathtir.eval.problems import FieldNames, Problem, check_problems, iter_problems
from mathtir.eval.records import (
    RecordsError,
    RecordStore,
    SampleRecord,
    complete_lines,
    encode_json,
    field_type_error,
)
from mathtir.eval.rejection import DROP_REASONS, KeepRules, ProblemSelection, select
from mathtir.eval.timeline import TimedExecutor, TimedSampler, WallClock
from mathtir.eval.tir import TIRConfig
from mathtir.files import atomic_target, atomic_write_json, atomic_write_text, file_sha256
from mathtir.formats import OutputFormat, get_dialect, get_template
from mathtir.readers import InvalidRecord, parse_json_object

log = logging.getLogger("mathtir.generate")

INDEX_FILE = "index.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
# What decides which solutions come out: a rerun into the same --output must agree on all of it.
GENERATION_IDENTITY = (*IDENTITY_ARGS, "samples", "shard_problems", "max_kept", "allow_no_code",
                       "allow_code_errors", "allow_timeouts", "min_pass_rate", "max_pass_rate", "near_duplicate")
# Pass-rate histogram buckets: unsolved, (0, 1/4], (1/4, 1/2], (1/2, 3/4], (3/4, 1), always solved.
PASS_RATE_BUCKETS = ("0", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "1")
NO_CATEGORY = "(none)"


def build_parser(prog: str = "mathtir generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_sampling_arguments(p, samples=8, samples_help="trajectories sampled per problem")
    keep = p.add_argument_group("what is kept")
    keep.add_argument("--max-kept", type=int, default=4, help="solutions kept per problem at most")
    keep.add_argument("--allow-no-code", action="store_true", help="keep solutions without a code block too")
    keep.add_argument("--allow-code-errors", action="store_true",
                      help="keep solutions in which a code block raised or was killed")
    keep.add_argument("--allow-timeouts", action="store_true", help="keep solutions in which a code block timed out")
    keep.add_argument("--min-pass-rate", type=float, default=0.0,
                      help="drop problems the teacher solves less often than this (too hard)")
    keep.add_argument("--max-pass-rate", type=float, default=1.0,
                      help="drop problems the teacher solves more often than this (too easy)")
    keep.add_argument("--near-duplicate", type=float, default=0.9,
                      help="Jaccard similarity (character 5-grams) at which a solution repeats a kept one")
    keep.add_argument("--teacher", default=None,
                      help="name written into every solution (default: --api-model, else the --model directory)")
    keep.add_argument("--shard-problems", type=int, default=1000,
                      help="problems per shard (records, solutions and resume work shard by shard)")
    return p


def keep_rules(args: argparse.Namespace) -> KeepRules:
    return KeepRules(max_kept=args.max_kept, require_code=not args.allow_no_code,
                     allow_code_errors=args.allow_code_errors, allow_timeouts=args.allow_timeouts,
                     min_pass_rate=args.min_pass_rate, max_pass_rate=args.max_pass_rate,
                     near_duplicate=args.near_duplicate)


def check_generation_args(args: argparse.Namespace) -> None:
    check_args(args)
    for name in ("max_kept", "shard_problems"):
        if getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not 0 <= args.min_pass_rate <= args.max_pass_rate <= 1:
        raise JobError(f"need 0 <= --min-pass-rate <= --max-pass-rate <= 1 (got {args.min_pass_rate}, "
                       f"{args.max_pass_rate})")
    if not 0 < args.near_duplicate <= 1:
        raise JobError(f"--near-duplicate must be in (0, 1] (got {args.near_duplicate})")


def teacher_name(args: argparse.Namespace) -> str:
    return args.teacher or args.api_model or Path(args.model).name


# -- the sharded run -----------------------------------------------------------------------------------------

class ShardIndex:
    """index.jsonl: one line per sealed shard, appended and fsync'd after the shard's files are in place, so a
    shard is either sealed with all its files or resealed on resume (its files rewritten whole)."""

    REQUIRED = {"shard": (int,), "problems": (int,), "samples": (int,), "correct": (int,), "kept": (int,),
                "dropped": (dict,), "categories": (dict,), "pass_rate_histogram": (dict,),
                "generated_tokens": (int,), "solutions_sha256": (str, type(None))}

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[int, dict] = {}
        self.torn_bytes = 0
        if path.exists():
            lines, self.torn_bytes = complete_lines(path)
            for lineno, line in lines:
                where = f"{path}:{lineno}"
                entry = parse_json_object(line, where)
                if isinstance(entry, InvalidRecord):
                    raise RecordsError(f"{where}: unreadable index line ({entry.reason})")
                missing = [key for key in self.REQUIRED if key not in entry]
                if missing:
                    raise RecordsError(f"{where}: index line lacks field(s) {', '.join(missing)}")
                wrong = next(filter(None, (field_type_error(key, entry[key], kinds)
                                           for key, kinds in self.REQUIRED.items())), None)
                if wrong:
                    raise RecordsError(f"{where}: {wrong}")
                if entry["shard"] in self.entries:
                    raise RecordsError(f"{where}: shard {entry['shard']} sealed twice")
                self.entries[entry["shard"]] = entry
        self._file = open(path, "ab")

    def add(self, entry: dict) -> None:
        self._file.write((encode_json(entry) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries[entry["shard"]] = entry

    def close(self) -> None:
        self._file.close()


def shard_name(kind: str, shard: int) -> str:
    return f"{kind}/{'part' if kind == 'solutions' else 'shard'}-{shard:06d}.jsonl"


def pass_rate_bucket(selection: ProblemSelection) -> str:
    rate = selection.pass_rate
    if rate == 0:
        return PASS_RATE_BUCKETS[0]
    if rate == 1:
        return PASS_RATE_BUCKETS[-1]
    return PASS_RATE_BUCKETS[math.ceil(rate * 4)]  # (0, 1/4] -> 1 ... (3/4, 1) -> 4


class Generation:
    """The shards of one run: which are sealed (the index), the problems and records of the open ones, and
    sealing. Problems are read from the data shard by shard as the run reaches them and leave memory with
    their shard, so the driver holds a window of the run, never all of it."""

    def __init__(self, output: Path, data: str | Path, fields: FieldNames, count: int, *, samples: int,
                 shard_problems: int, rules: KeepRules, teacher: str):
        """`count`: how many problems `data` holds (check_problems checked them all before the run)."""
        self.output = output
        self.data, self.fields, self.count = data, fields, count
        self.shard_problems = shard_problems
        self.num_shards = -(-count // shard_problems)
        self.samples = samples
        self.rules = rules
        self.teacher = teacher
        for kind in ("records", "solutions", "problems"):
            (output / kind).mkdir(parents=True, exist_ok=True)
        self.index = ShardIndex(output / INDEX_FILE)
        strays = sorted(set(self.index.entries) - set(range(self.num_shards)))
        if strays:
            raise RecordsError(f"{self.index.path}: shards {strays[:5]} do not exist for this data")
        self.open: dict[int, RecordStore] = {}
        self.problems_of: dict[int, list[Problem]] = {}  # the open shards' problems
        self.shard_of: dict[str, int] = {}  # problem id -> shard, for the open shards
        self.sealing_s = 0.0
        self.torn_bytes = self.index.torn_bytes

    def shard_size(self, j: int) -> int:
        return min(self.shard_problems, self.count - j * self.shard_problems)

    def read_shards(self, last: int | None = None):
        """(shard, its problems) in order, read from the data as they are reached (up to shard `last`)."""
        changed = RecordsError(f"{self.data}: changed during the run (it held {self.count} problems when the run "
                               f"started; the manifest has its sha256)")
        chunk: list[Problem] = []
        j = read = 0
        for problem in iter_problems(self.data, self.fields):
            if read == self.count:
                raise changed
            chunk.append(problem)
            read += 1
            if len(chunk) == self.shard_size(j):
                yield j, chunk
                if last is not None and j >= last:
                    return
                chunk, j = [], j + 1
        if read != self.count:
            raise changed

    def recorded_at_start(self) -> int:
        """Samples already done: those of sealed shards, plus those of shards left open by a killed run (whose
        records are read now; a shard found complete is sealed at once)."""
        done = sum(self.shard_size(j) * self.samples for j in self.index.entries)
        left_open = [j for j in range(self.num_shards)
                     if j not in self.index.entries and (self.output / shard_name("records", j)).exists()]
        if left_open:
            for j, problems in self.read_shards(last=max(left_open)):
                if j in left_open:
                    done += len(self.open_shard(j, problems))
                    self.seal_if_complete(j)
        return done

    def open_shard(self, j: int, problems: list[Problem]) -> RecordStore:
        if j not in self.open:
            store = RecordStore(self.output / shard_name("records", j), sync_interval_s=1.0)
            self.torn_bytes += store.torn_bytes
            ids = {p.id for p in problems}
            strays = sorted({pid for pid, index in store.records if pid not in ids or index >= self.samples})
            if strays:
                raise RecordsError(f"{store.path}: records of problems not in this shard, or sample indices "
                                   f">= --samples {self.samples}: {strays[:5]}")
            self.open[j] = store
            self.problems_of[j] = problems
            self.shard_of.update(dict.fromkeys(ids, j))
        return self.open[j]

    def todo(self):
        """(problem, sample index) still to generate, shard by shard, reading and opening each shard as it is
        reached."""
        if len(self.index.entries) == self.num_shards:
            return
        for j, problems in self.read_shards():
            if j in self.index.entries:
                continue
            store = self.open_shard(j, problems)
            for problem in problems:
                for index in range(self.samples):
                    if (problem.id, index) not in store:
                        yield problem, index

    def record(self, problem: Problem, record: SampleRecord) -> None:
        j = self.shard_of[problem.id]
        self.open[j].append(record)
        self.seal_if_complete(j)

    def seal_if_complete(self, j: int) -> None:
        store = self.open[j]
        problems = self.problems_of[j]
        if len(store) < len(problems) * self.samples:
            return
        started = time.perf_counter()
        by_problem: dict[str, list[SampleRecord]] = {}
        for record in store.records.values():
            by_problem.setdefault(record.problem_id, []).append(record)
        entry = {"shard": j, "problems": len(problems), "samples": len(store), "correct": 0, "kept": 0,
                 "dropped": Counter(), "categories": {}, "pass_rate_histogram": Counter(),
                 "generated_tokens": sum(r.generated_tokens for r in store.records.values())}
        solutions, problem_lines = [], []
        for problem in problems:
            selection = select(problem.id, by_problem[problem.id], self.rules)
            reasons = selection.reasons()
            entry["correct"] += selection.correct
            entry["kept"] += len(selection.kept)
            entry["dropped"].update(reasons)
            entry["pass_rate_histogram"][pass_rate_bucket(selection)] += 1
            category = entry["categories"].setdefault(problem.category or NO_CATEGORY, Counter())
            category.update(problems=1, samples=selection.samples, correct=selection.correct,
                            kept=len(selection.kept), unsolved=selection.correct == 0,
                            with_solutions=bool(selection.kept))
            problem_lines.append({"problem_id": problem.id, "category": problem.category,
                                  "samples": selection.samples, "correct": selection.correct,
                                  "pass_rate": round(selection.pass_rate, 4), "kept": len(selection.kept),
                                  "dropped": dict(sorted(reasons.items()))})
            solutions += [self.solution_row(problem, selection, r) for r in selection.kept]
        # No part file for a shard that kept nothing: readers rightly refuse an empty input file.
        solutions_sha256 = write_jsonl(self.output / shard_name("solutions", j), solutions) if solutions else None
        write_jsonl(self.output / shard_name("problems", j), problem_lines)
        entry.update(dropped=dict(entry["dropped"]), pass_rate_histogram=dict(entry["pass_rate_histogram"]),
                     categories={k: dict(v) for k, v in entry["categories"].items()},
                     solutions_sha256=solutions_sha256)
        store.close()
        self.index.add(entry)  # last: a kill before this line reseals the shard on resume
        del self.open[j], self.problems_of[j]
        for problem in problems:
            del self.shard_of[problem.id]
        self.sealing_s += time.perf_counter() - started

    def solution_row(self, problem: Problem, selection: ProblemSelection, record: SampleRecord) -> dict:
        # OpenMathReasoning's fields first (problem, generated_solution, expected_answer, inference_mode), then
        # where the solution came from
        return {"problem": problem.problem, "generated_solution": record.text,
                "expected_answer": problem.expected_answer, "inference_mode": "tir", "problem_id": problem.id,
                "category": problem.category, "sample_index": record.sample_index, "teacher": self.teacher,
                "pass_rate": round(selection.pass_rate, 4), "code_rounds": record.code_rounds,
                "generated_tokens": record.generated_tokens}

    def unsealed(self) -> list[int]:
        return [j for j in range(self.num_shards) if j not in self.index.entries]

    def close(self) -> None:
        for store in self.open.values():
            store.close()
        self.index.close()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Writes the rows whole (atomic, fsync'd); the sha256 of what was written, hashed without reading it back."""
    data = "".join(encode_json(row) + "\n" for row in rows).encode()
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


# -- the report ----------------------------------------------------------------------------------------------

def summarize(entries: list[dict]) -> dict:
    total = Counter()
    dropped, histogram, categories = Counter(), Counter(), {}
    for entry in entries:
        total.update({k: entry[k] for k in ("problems", "samples", "correct", "kept", "generated_tokens")})
        dropped.update(entry["dropped"])
        histogram.update(entry["pass_rate_histogram"])
        for name, figures in entry["categories"].items():
            categories.setdefault(name, Counter()).update(figures)
    summary = dict(total)
    summary.update(
        kept_fraction=round(total["kept"] / total["samples"], 4) if total["samples"] else None,
        teacher_pass_rate=round(total["correct"] / total["samples"], 4) if total["samples"] else None,
        problems_with_solutions=sum(c["with_solutions"] for c in categories.values()),
        unsolved_problems=sum(c["unsolved"] for c in categories.values()),
        dropped={reason: dropped[reason] for reason in DROP_REASONS if dropped[reason]},
        pass_rate_histogram={bucket: histogram[bucket] for bucket in PASS_RATE_BUCKETS},
        categories={name: dict(figures) for name, figures in sorted(categories.items())})
    return summary


def render_report(summary: dict, *, args: argparse.Namespace, teacher: str, run_stats: dict) -> str:
    samples = summary.get("samples", 0)

    def share(n: int) -> str:
        return f"{100 * n / samples:.1f}%" if samples else "-"

    lines = [f"# Generated TIR solutions: {teacher}", "",
             f"Data `{args.data}`, {args.samples} samples per problem, at most {args.max_kept} kept per problem, "
             f"{args.max_tokens} tokens, at most {args.max_code_executions} code executions.", "",
             "| problems | samples | teacher pass rate | kept | kept / samples | problems with a solution | unsolved |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| {summary.get('problems', 0)} | {samples} | {summary['teacher_pass_rate']} | "
             f"{summary.get('kept', 0)} | {summary['kept_fraction']} | {summary['problems_with_solutions']} | "
             f"{summary['unsolved_problems']} |", "",
             "## Why samples were not kept", "", "| reason | samples | share |", "|---|---:|---:|"]
    lines += [f"| {reason} | {n} | {share(n)} |" for reason, n in summary["dropped"].items()]
    lines += ["", "## Per category", "",
              "| category | problems | samples | pass rate | kept | problems with a solution | unsolved |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in summary["categories"].items():
        rate = f"{c['correct'] / c['samples']:.3f}" if c.get("samples") else "-"
        lines.append(f"| {name} | {c['problems']} | {c['samples']} | {rate} | {c['kept']} | "
                     f"{c['with_solutions']} | {c['unsolved']} |")
    lines += ["", "## Problems by the teacher's pass rate", "", "| pass rate | problems |", "|---|---:|"]
    lines += [f"| {bucket} | {n} |" for bucket, n in summary["pass_rate_histogram"].items()]
    wall = run_stats["wall_clock"]
    lines += ["", "## Run", "",
              f"{run_stats['generated_samples']} samples generated in this attempt, "
              f"{run_stats['samples_per_s']} samples/s over sampling; selecting and writing took "
              f"{run_stats['sealing_s']} s of {wall['wall_s']} s wall.", "",
              "Per problem (pass rate, kept, why the others were dropped): `problems/shard-*.jsonl`.", "",
              "Next, the solutions into stage-2 shards:", "", "```bash",
              f"mathtir data prepare nemo_configs/data_openmathreasoning.yaml "
              f"'inputs=[{Path(args.output).resolve()}/solutions/*.jsonl]' filters.modes='[tir]' "
              "filters.require_code=true verify.enabled=true tokenizer=... output_dir=...", "```", ""]
    return "\n".join(lines)


# -- the job -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, prog: str = "mathtir generate") -> int:
    return run_job(run, build_parser(prog), argv)


def run(args: argparse.Namespace, *, start_sampling=None) -> int:
    """The job. `start_sampling(args)` -> (sampler, executor, close) replaces Ray (bench/: stand-ins that
    measure the bookkeeping alone)."""
    from tqdm import tqdm

    check_generation_args(args)
    fields = FieldNames(args.id_field, args.problem_field, args.answer_field, args.category_field)
    count = check_problems(args.data, fields)  # every record checked before anything starts
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    manifest = prepare_manifest(output, args, file_sha256(args.data), identity_args=GENERATION_IDENTITY,
                                parser=build_parser)
    attempt = len(manifest["attempts"])
    teacher = teacher_name(args)
    clock = WallClock()
    generation = Generation(output, args.data, fields, count, samples=args.samples,
                            shard_problems=args.shard_problems, rules=keep_rules(args), teacher=teacher)
    try:
        resumed = generation.recorded_at_start()
        todo_count = count * args.samples - resumed
        log.info("%d problems x %d samples in %d shard(s): %d already recorded, %d to generate", count,
                 args.samples, generation.num_shards, resumed, todo_count)
        manifest["attempts"][-1].update(resumed_samples=resumed, torn_bytes=generation.torn_bytes)
        atomic_write_json(output / MANIFEST_FILE, manifest)  # an attempt killed later still tells what it found
        sampler_stats = exec_stats = None
        if todo_count:
            config = TIRConfig(max_tokens=args.max_tokens, max_code_executions=args.max_code_executions,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                               answer_fallback=args.answer_fallback)
            output_format = OutputFormat(max_chars=args.output_max_chars, truncation=args.output_truncation,
                                         errors=args.output_errors, remaining_notice=args.remaining_notice)
            tokenizer = model_tokenizer(args)
            try:
                template = get_template(args.prompt_template, tokenizer=tokenizer, system=args.system)
            except ValueError as e:
                raise JobError(f"--prompt-template {args.prompt_template}: {e} (--model {args.model})") from e
            sampler, executor, close = (start_sampling or start_ray_sampling)(args)
            try:
                sampler, executor = TimedSampler(sampler, clock), TimedExecutor(executor, clock)
                progress = tqdm(total=count * args.samples, initial=resumed, desc="samples",
                                disable=args.no_progress, mininterval=1 if sys.stderr.isatty() else 10,
                                file=sys.stderr)

                def finished(problem: Problem, record: SampleRecord) -> None:
                    generation.record(problem, record)
                    progress.update(1)

                clock.start_sampling()
                asyncio.run(run_samples(generation.todo(), finished, sampler=sampler, executor=executor,
                                        tokenizer=tokenizer, template=template, dialect=get_dialect(args.dialect),
                                        output_format=output_format, config=config, attempt=attempt,
                                        max_in_flight=args.max_in_flight))
                clock.end_sampling()
                progress.close()
                sampler_stats, exec_stats = sampler.stats(), executor.stats()
            finally:
                close()
        left = generation.unsealed()
        if left:  # every sample was drawn, so every shard must have been sealed
            raise RecordsError(f"{output}: shards {left[:5]} are still open after the run")
        entries = [generation.index.entries[j] for j in sorted(generation.index.entries)]
    finally:
        generation.close()
    summary = summarize(entries)
    breakdown = clock.breakdown()
    sampling_s = sum(breakdown[k] for k in ("generation", "execution", "queueing"))
    run_stats = {"wall_s": breakdown["wall_s"], "generated_samples": todo_count,
                 "samples_per_s": round(todo_count / sampling_s, 4) if todo_count and sampling_s else None,
                 "sealing_s": round(generation.sealing_s, 3), "wall_clock": breakdown,
                 "sampler": sampler_stats, "sandbox": exec_stats}
    atomic_write_json(output / SUMMARY_FILE, {**summary, "teacher": teacher, "run": run_stats})
    atomic_write_text(output / REPORT_FILE, render_report(summary, args=args, teacher=teacher, run_stats=run_stats))
    manifest["attempts"][-1].update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run_stats)
    manifest["status"] = "complete"
    atomic_write_json(output / MANIFEST_FILE, manifest)
    log.info("done: %d of %d samples kept (%s); %s", summary.get("kept", 0), summary.get("samples", 0),
             summary["kept_fraction"], output / REPORT_FILE)
    return 0


def start_ray_sampling(args: argparse.Namespace):
    from mathtir.eval.execution import start_sandbox

    ray = init_ray(args)
    try:
        return start_samplers(ray, args), start_sandbox(ray, args), ray.shutdown
    except BaseException:
        ray.shutdown()
        raise
