"""The evaluation job: validate data, resume records, start sampler + sandbox actors, run every sample's TIR
loop concurrently, then write metrics.json, report.md (+ PNG plots) and the run manifest.

Entry points: ``mathtir eval run ...`` and ``ray_eval/run.py`` (``ray job submit --working-dir . -- python
ray_eval/run.py ...``). With
``RAY_ADDRESS`` set the job joins that cluster; otherwise it starts an embedded Ray bound to 127.0.0.1 with no
dashboard.

Output directory:
    manifest.json    model, data file + sha256, arguments, code revision, one entry per attempt (resume)
    records.jsonl    one line per finished sample, appended and fsync'd at once
    metrics.json     majority@k, pass@k, pass@1, no-answer rate, per category, 95% CIs (+ run statistics)
    report.md        the tables, with plots/accuracy_vs_k.png and plots/category_accuracy.png
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from mathtir.eval.problems import FieldNames, Problem, load_problems
from mathtir.eval.records import RECORDS_FILE, RecordsError, RecordStore, SampleRecord
from mathtir.eval.samplers import BACKENDS
from mathtir.eval.timeline import TimedExecutor, TimedSampler, WallClock
from mathtir.eval.tir import TIRConfig, run_sample
from mathtir.files import atomic_write_json, file_sha256
from mathtir.formats import DIALECT_NAMES, TEMPLATE_NAMES, OutputFormat, get_dialect, get_template
from mathtir.readers import DataError

log = logging.getLogger("mathtir.eval")

MANIFEST_FILE = "manifest.json"
REPO = Path(__file__).resolve().parents[2]

# Arguments that decide what a sample is: a rerun into the same --output must agree on all of them, or its
# samples would be mixed with differently generated ones. (--samples may grow: new indices are just added.)
IDENTITY_ARGS = ("model", "backend", "api_model", "api_mode", "prompt_template", "system", "dialect", "max_tokens",
                 "max_code_executions", "temperature", "top_p", "seed", "exec_timeout", "output_max_chars",
                 "output_truncation", "output_errors", "remaining_notice", "answer_fallback")


class JobError(RuntimeError):
    pass


def build_parser(prog: str = "mathtir eval run") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_sampling_arguments(p, samples=15, samples_help="samples per problem (majority vote over them)")
    return p


def add_sampling_arguments(p: argparse.ArgumentParser, *, samples: int, samples_help: str) -> None:
    """The options of every job that samples TIR trajectories (evaluation, generation): model and backend,
    data, the loop, the sandbox and the resources."""
    p.add_argument("--model", help="HF model directory (hf, vllm); for openai: the tokenizer directory, optional")
    p.add_argument("--data", required=True, help="problems: .jsonl or .parquet")
    p.add_argument("--output", required=True, help="output directory (a rerun resumes it)")
    p.add_argument("--samples", type=int, default=samples, help=samples_help)
    p.add_argument("--max-code-executions", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=4096, help="response budget: generated + inserted tokens")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-template", default="llmjp", choices=TEMPLATE_NAMES)
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--dialect", default="tir", choices=DIALECT_NAMES)
    p.add_argument("--backend", default="hf", choices=list(BACKENDS))
    p.add_argument("--answer-fallback", action="store_true",
                   help="without a \\boxed{} answer, read one from the prose (答えは…, Answer: …, the last number); "
                        "recorded per sample as answer_source and reported as its own rate")
    fields = p.add_argument_group("data fields")
    fields.add_argument("--id-field", default="id")
    fields.add_argument("--problem-field", default="problem")
    fields.add_argument("--answer-field", default="expected_answer")
    fields.add_argument("--category-field", default="category")
    code = p.add_argument_group("code execution")
    code.add_argument("--exec-timeout", type=float, default=10.0, help="seconds per code block")
    code.add_argument("--output-max-chars", type=int, default=1000)
    code.add_argument("--output-truncation", default="head_tail", choices=("head_tail", "head"))
    code.add_argument("--output-errors", default="last_line", choices=("last_line", "traceback"))
    code.add_argument("--remaining-notice", action="store_true", help="tell the model executions left")
    code.add_argument("--sandbox-actors", type=int, default=None,
                      help="sandbox actors (default: one per unit of the cluster's 'sandbox' resource)")
    code.add_argument("--sandbox-workers", type=int, default=2, help="sandbox worker processes per actor")
    code.add_argument("--max-concurrent-executions", type=int, default=None,
                      help="cap on executions in flight across the job (default: actors x workers)")
    res = p.add_argument_group("sampling resources")
    res.add_argument("--sampler-replicas", type=int, default=None,
                     help="sampler actors (default: cluster GPUs / --sampler-gpus, at least 1)")
    res.add_argument("--sampler-gpus", type=int, default=None,
                     help="GPUs per sampler actor (default: 1 if the cluster has GPUs else 0; vllm: the TP size)")
    res.add_argument("--sampler-cpus", type=float, default=1.0)
    res.add_argument("--max-batch-size", type=int, default=32, help="hf: rows decoded together")
    res.add_argument("--prefix-cache-mb", type=int, default=2048,
                     help="hf: KV cache kept for trajectories waiting on the sandbox, per replica")
    res.add_argument("--max-in-flight", type=int, default=256,
                     help="trajectories in flight in the job (openai: also the HTTP requests held at once)")
    engine = p.add_argument_group("vllm backend")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    engine.add_argument("--max-num-seqs", type=int, default=256, help="sequences one engine decodes at once")
    engine.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    engine.add_argument("--no-prefix-caching", action="store_true",
                        help="turn off vLLM prefix caching (on by default: a trajectory's rounds share a prefix)")
    api = p.add_argument_group("openai backend")
    api.add_argument("--api-base", default="http://127.0.0.1:8000/v1")
    api.add_argument("--api-model", default=None)
    api.add_argument("--api-mode", default="completions", choices=("completions", "chat"),
                     help="completions: a served model; chat: a chat API (a code block ends the assistant's turn, "
                          "its output comes back as the next user message)")
    api.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    api.add_argument("--price-input-per-mtok", type=float, default=None, help="USD per million prompt tokens")
    api.add_argument("--price-output-per-mtok", type=float, default=None,
                     help="USD per million generated tokens (with either price, the cost is in metrics)")
    p.add_argument("--embedded-cpus", type=int, default=None, help="CPUs of an embedded Ray (default: all)")
    p.add_argument("--no-progress", action="store_true")


def uploaded_working_dir() -> str | None:
    """The working_dir of the `ray job submit` that started this driver (None outside one): Ray's job
    supervisor hands the job's runtime_env to the driver in this environment variable."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except json.JSONDecodeError:
        return None
    return (config.get("runtime_env") or {}).get("working_dir")


def check_paths(args: argparse.Namespace) -> None:
    """In a submitted job the driver runs in Ray's temporary copy of the uploaded working directory: a
    relative --output would be written there and deleted with it, and run outputs (runs/) are not uploaded
    (.rayignore), so a relative --model or --data would be found there or not by accident. The submitting
    directory is not known here, so relative paths are refused, naming the fix."""
    working_dir = uploaded_working_dir()
    if working_dir is None:
        return
    relative = [(flag, value) for flag, value in (("--model", args.model), ("--data", args.data),
                                                   ("--output", args.output))
                if value and not Path(value).is_absolute()]
    if relative:
        flags = ", ".join(f"{flag} {value}" for flag, value in relative)
        fixed = " ".join(f'{flag} "$PWD/{value}"' for flag, value in relative)
        raise JobError(f"{flags}: relative path(s) in a `ray job submit` job, which runs in Ray's temporary "
                       f"copy of the working directory ({Path.cwd()}, from {working_dir}; run outputs are not "
                       f"uploaded); give paths every node sees, e.g. typed in the submitting shell: {fixed}")


def check_args(args: argparse.Namespace) -> None:
    check_paths(args)
    positive = ("samples", "max_tokens", "max_batch_size", "max_in_flight", "sandbox_workers", "max_num_seqs",
                "prefix_cache_mb")
    for name in positive:
        if getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.max_code_executions < 0:
        raise JobError("--max-code-executions must be >= 0")
    if not 0 < args.top_p <= 1:
        raise JobError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.temperature < 0:
        raise JobError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.backend in ("hf", "vllm"):
        if not args.model:
            raise JobError(f"--backend {args.backend} needs --model DIR")
        if not (Path(args.model) / "config.json").is_file():
            raise JobError(f"--model {args.model}: not a Hugging Face model directory (no config.json)")
    if args.backend == "openai" and not args.api_model:
        raise JobError("--backend openai needs --api-model NAME")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise JobError(f"--gpu-memory-utilization must be in (0, 1] (got {args.gpu_memory_utilization})")


# -- manifest ------------------------------------------------------------------------------------------------

def code_revision() -> dict:
    """The git commit when the code runs from a checkout; always a hash of the sources that ran (a job's
    working directory is uploaded without .git)."""
    revision = None
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "mathtir",
                                    "ray_eval"], capture_output=True, text=True, timeout=10).stdout.strip()
            revision = out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    h = hashlib.sha256()
    for path in sorted([*REPO.glob("mathtir/**/*.py"), *REPO.glob("ray_eval/*.py")]):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return {"git": revision, "source_sha256": h.hexdigest()}


def prepare_manifest(output: Path, args: argparse.Namespace, data_sha256: str, *,
                     identity_args: tuple[str, ...] = IDENTITY_ARGS, parser=build_parser) -> dict:
    path = output / MANIFEST_FILE
    identity = {k: getattr(args, k) for k in identity_args}
    identity["data_sha256"] = data_sha256
    if path.exists():
        manifest = json.loads(path.read_text())
        # An argument added after the run started is recorded as absent: it then counts as its default.
        defaults = vars(parser().parse_args(["--data", "-", "--output", "-"]))
        recorded = {k: manifest["identity"].get(k, defaults.get(k)) for k in identity}
        differing = {k: (recorded[k], v) for k, v in identity.items() if recorded[k] != v}
        if differing:
            lines = "\n".join(f"  {k}: recorded {old!r}, now {new!r}" for k, (old, new) in differing.items())
            raise JobError(f"{output}: holds samples of a different run; use a new --output or the same "
                           f"arguments:\n{lines}")
    else:
        manifest = {"identity": identity, "attempts": []}
    manifest.update({"model": args.model, "data": str(Path(args.data).resolve()), "data_sha256": data_sha256,
                     "args": vars(args), "status": "running"})
    manifest["attempts"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code_revision(),
                                 "host": os.uname().nodename, "ray_address": os.environ.get("RAY_ADDRESS")})
    atomic_write_json(path, manifest)
    return manifest


# -- Ray -----------------------------------------------------------------------------------------------------

def init_ray(args: argparse.Namespace):
    if os.environ.get("RAY_ADDRESS"):  # the cluster's auth mode (and token) come from the environment
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return ray
    from mathtir.eval import embedded_ray

    cpus = args.embedded_cpus or os.cpu_count()
    sandbox_units = args.sandbox_actors or 1
    # Serves nobody else: loopback only, a fresh token, no dashboard, no orphans of a killed driver.
    try:
        ray = embedded_ray.start(args.output, num_cpus=cpus, resources={"sandbox": sandbox_units},
                                 object_store_bytes=200 * 1024 * 1024)
    except embedded_ray.EmbeddedRayError as e:
        raise JobError(str(e)) from e
    log.info("started an embedded Ray on loopback with token auth (%s CPUs, %s sandbox units)", cpus, sandbox_units)
    return ray


def start_samplers(ray, args: argparse.Namespace):
    from mathtir.eval.actors import RemoteSampler, place_sampler_replicas, sampler_actor_class

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    per_replica = args.sampler_gpus if args.sampler_gpus is not None else (1 if gpus else 0)
    replicas = args.sampler_replicas or max(1, gpus // per_replica if per_replica else 1)
    if per_replica * replicas > gpus:
        raise JobError(f"{replicas} sampler replica(s) x {per_replica} GPU(s) > the cluster's {gpus} GPU(s)")
    if args.backend == "hf":
        kwargs = {"model_dir": str(Path(args.model).resolve()), "max_batch_size": args.max_batch_size,
                  "num_threads": max(1, int(args.sampler_cpus)), "prefix_cache_mb": args.prefix_cache_mb}
    elif args.backend == "vllm":
        kwargs = {"model_dir": str(Path(args.model).resolve()), "tensor_parallel_size": max(1, per_replica),
                  "gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": args.max_model_len,
                  "max_num_seqs": args.max_num_seqs, "enable_prefix_caching": not args.no_prefix_caching}
    else:
        kwargs = {"base_url": args.api_base, "model": args.api_model, "mode": args.api_mode,
                  "api_key_env": args.api_key_env, "dialect": args.dialect,
                  "max_in_flight": -(-args.max_in_flight // replicas),
                  "price_input_per_mtok": args.price_input_per_mtok,
                  "price_output_per_mtok": args.price_output_per_mtok,
                  "tokenizer_dir": str(Path(args.model).resolve()) if args.model else None}
    if per_replica:
        placements = place_sampler_replicas(ray, replicas=replicas, gpus_per_replica=per_replica,
                                            cpus_per_replica=args.sampler_cpus,
                                            tensor_parallel=args.backend == "vllm" and per_replica > 1)
    else:
        placements = [{"num_cpus": args.sampler_cpus, "num_gpus": 0}] * replicas
    actor_cls = sampler_actor_class()
    actors = [actor_cls.options(max_restarts=3, **placement).remote(args.backend, kwargs)
              for placement in placements]
    interface = ray.get([a.interface.remote() for a in actors], timeout=600)[0]
    log.info("%d %s sampler replica(s) ready (%d GPU each)", replicas, args.backend, per_replica)
    return RemoteSampler(actors, uses_token_ids=interface["uses_token_ids"], chat=interface["chat"])


def model_tokenizer(args: argparse.Namespace):
    if not args.model:
        log.warning("no --model tokenizer: inserted output tokens are estimated (3 bytes per token)")
        return None
    from mathtir.tokenizers import load_tokenizer

    return load_tokenizer(args.model)


# -- the run -------------------------------------------------------------------------------------------------

async def run_samples(todo: Iterable[tuple[Problem, int]], finished: Callable[[Problem, SampleRecord], None], *,
                      sampler, executor, tokenizer, template, dialect, output_format, config: TIRConfig,
                      attempt: int, max_in_flight: int) -> None:
    """Runs every (problem, sample index) of `todo` with at most `max_in_flight` trajectories at once, calling
    `finished` with each record as soon as it is done. `todo` is drawn only as slots free up, so a run of
    millions of samples holds a window of them, never the whole list, and the first error stops the rest."""
    pending = iter(todo)

    async def worker() -> None:
        # One of max_in_flight workers, each drawing its next sample as it finishes one: a task per worker, not
        # per sample, and no waiting set to scan when one finishes.
        for problem, index in pending:
            record = await run_sample(problem, index, sampler=sampler, executor=executor, tokenizer=tokenizer,
                                      template=template, dialect=dialect, output_format=output_format,
                                      config=config, attempt=attempt)
            finished(problem, record)

    workers = [asyncio.ensure_future(worker()) for _ in range(max_in_flight)]
    try:
        await asyncio.gather(*workers)  # raises the first sample's error
    finally:
        for task in workers:
            task.cancel()


def main(argv: list[str] | None = None, prog: str = "mathtir eval run") -> int:
    return run_job(run, build_parser(prog), argv)


def run_job(run: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: list[str] | None) -> int:
    """A sampling job from its command line: bad input (data, records, arguments) ends it with one `error:` line
    and exit status 2, before any sampling."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (DataError, RecordsError, JobError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mathtir.eval.execution import start_sandbox
    from mathtir.eval.report import write_results

    check_args(args)
    fields = FieldNames(args.id_field, args.problem_field, args.answer_field, args.category_field)
    problems = load_problems(args.data, fields)  # every record checked before anything starts
    data_sha256 = file_sha256(args.data)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    manifest = prepare_manifest(output, args, data_sha256)
    attempt = len(manifest["attempts"])
    dialect = get_dialect(args.dialect)
    output_format = OutputFormat(max_chars=args.output_max_chars, truncation=args.output_truncation,
                                 errors=args.output_errors, remaining_notice=args.remaining_notice)
    config = TIRConfig(max_tokens=args.max_tokens, max_code_executions=args.max_code_executions,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                       answer_fallback=args.answer_fallback)
    clock = WallClock()  # its parts (setup, generation, execution, queueing, finishing) sum to wall_s
    with RecordStore(output / RECORDS_FILE) as store:
        known = {p.id for p in problems}
        strays = sorted({pid for pid, _ in store.records} - known)
        if strays:
            raise RecordsError(f"{store.path}: records for problems not in {args.data}: {strays[:5]}")
        todo = [(p, i) for p in problems for i in range(args.samples) if (p.id, i) not in store]
        beyond = sum(index >= args.samples for _, index in store.records)
        if beyond:
            log.warning("%d recorded samples have an index >= --samples %d: kept in %s, left out of the "
                        "metrics", beyond, args.samples, store.path)
        resumed = len(problems) * args.samples - len(todo)
        log.info("%d problems x %d samples: %d already recorded, %d to generate%s", len(problems), args.samples,
                 resumed, len(todo), f" ({store.torn_bytes} bytes of a torn last line cut)" if store.torn_bytes
                 else "")
        manifest["attempts"][-1].update(resumed_samples=resumed, torn_bytes=store.torn_bytes)
        atomic_write_json(output / MANIFEST_FILE, manifest)  # an attempt killed later still tells what it found
        sampler_stats = exec_stats = None
        if todo:
            tokenizer = model_tokenizer(args)
            try:  # a known name the tokenizer cannot serve, e.g. "chat" without a chat template
                template = get_template(args.prompt_template, tokenizer=tokenizer, system=args.system)
            except ValueError as e:
                raise JobError(f"--prompt-template {args.prompt_template}: {e} (--model {args.model})") from e
            ray = init_ray(args)
            try:
                sampler = TimedSampler(start_samplers(ray, args), clock)
                executor = TimedExecutor(start_sandbox(ray, args), clock)
                progress = tqdm(total=len(problems) * args.samples, initial=resumed, desc="samples",
                                disable=args.no_progress, mininterval=1 if sys.stderr.isatty() else 10,
                                file=sys.stderr)

                def finished(problem: Problem, record: SampleRecord) -> None:
                    store.append(record)  # at once: a kill after this line loses nothing
                    progress.update(1)

                clock.start_sampling()
                asyncio.run(run_samples(todo, finished, sampler=sampler, executor=executor, tokenizer=tokenizer,
                                        template=template, dialect=dialect, output_format=output_format,
                                        config=config, attempt=attempt, max_in_flight=args.max_in_flight))
                clock.end_sampling()
                progress.close()
                sampler_stats, exec_stats = sampler.stats(), executor.stats()
            finally:
                ray.shutdown()
        records = [store.records[(p.id, i)] for p in problems for i in range(args.samples)]
    breakdown = clock.breakdown()
    sampling_s = sum(breakdown[k] for k in ("generation", "execution", "queueing"))
    generated = [r for r in records if r.attempt == attempt] if todo else []
    # samples/s over the sampling phase alone (the wall time also holds Ray and model start-up)
    run_stats = {"wall_s": round(breakdown["wall_s"], 2), "sampling_s": round(sampling_s, 2) if todo else None,
                 "generated_samples": len(todo),
                 "samples_per_s": round(len(todo) / sampling_s, 4) if todo else None,
                 "wall_clock": breakdown,
                 "throughput": {"backend": args.backend,
                                "samples_per_s": round(len(todo) / sampling_s, 4) if todo else None,
                                "generated_tokens_per_s": round(sum(r.generated_tokens for r in generated)
                                                                / sampling_s, 2) if todo else None},
                 "sampler": sampler_stats, "sandbox": exec_stats}
    write_results(output, problems, records, args=args, run_stats=run_stats)
    manifest["attempts"][-1].update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run_stats)
    manifest["status"] = "complete"
    atomic_write_json(output / MANIFEST_FILE, manifest)
    log.info("done: %s (%s)", output / "report.md", ", ".join(f"{k}={v}" for k, v in run_stats.items()
                                                                if k in ("wall_s", "generated_samples")))
    return 0

