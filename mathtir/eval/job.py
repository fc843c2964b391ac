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
from pathlib import Path

from mathtir.eval.problems import FieldNames, load_problems
from mathtir.eval.records import RECORDS_FILE, RecordsError, RecordStore
from mathtir.eval.samplers import BACKENDS
from mathtir.eval.tir import TIRConfig, run_sample
from mathtir.files import atomic_write_json, file_sha256
from mathtir.formats import DIALECT_NAMES, TEMPLATE_NAMES, OutputFormat, get_dialect, get_template
from mathtir.readers import DataError

log = logging.getLogger("mathtir.eval")

MANIFEST_FILE = "manifest.json"
REPO = Path(__file__).resolve().parents[2]

# Arguments that decide what a sample is: a rerun into the same --output must agree on all of them, or its
# samples would be mixed with differently generated ones. (--samples may grow: new indices are just added.)
IDENTITY_ARGS = ("model", "backend", "api_model", "prompt_template", "system", "dialect", "max_tokens",
                 "max_code_executions", "temperature", "top_p", "seed", "exec_timeout", "output_max_chars",
                 "output_truncation", "output_errors", "remaining_notice", "answer_fallback")


class JobError(RuntimeError):
    pass


def build_parser(prog: str = "mathtir eval run") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="HF model directory (hf, vllm); for openai: the tokenizer directory, optional")
    p.add_argument("--data", required=True, help="problems: .jsonl or .parquet")
    p.add_argument("--output", required=True, help="output directory (a rerun resumes it)")
    p.add_argument("--samples", type=int, default=15, help="samples per problem (majority vote over them)")
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
    res.add_argument("--max-in-flight", type=int, default=256, help="trajectories in flight in the job")
    api = p.add_argument_group("openai backend")
    api.add_argument("--api-base", default="http://127.0.0.1:8000/v1")
    api.add_argument("--api-model", default=None)
    api.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    p.add_argument("--embedded-cpus", type=int, default=None, help="CPUs of an embedded Ray (default: all)")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_args(args: argparse.Namespace) -> None:
    positive = ("samples", "max_tokens", "max_batch_size", "max_in_flight", "sandbox_workers")
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


def prepare_manifest(output: Path, args: argparse.Namespace, data_sha256: str) -> dict:
    path = output / MANIFEST_FILE
    identity = {k: getattr(args, k) for k in IDENTITY_ARGS}
    identity["data_sha256"] = data_sha256
    if path.exists():
        manifest = json.loads(path.read_text())
        # An argument added after the run started is recorded as absent: it then counts as its default.
        defaults = vars(build_parser().parse_args(["--data", "-", "--output", "-"]))
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
    from mathtir.eval.actors import RemoteSampler, sampler_actor_class

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    per_replica = args.sampler_gpus if args.sampler_gpus is not None else (1 if gpus else 0)
    replicas = args.sampler_replicas or max(1, gpus // per_replica if per_replica else 1)
    if per_replica * replicas > gpus:
        raise JobError(f"{replicas} sampler replica(s) x {per_replica} GPU(s) > the cluster's {gpus} GPU(s)")
    if args.backend == "hf":
        kwargs = {"model_dir": str(Path(args.model).resolve()), "max_batch_size": args.max_batch_size,
                  "num_threads": max(1, int(args.sampler_cpus))}
    elif args.backend == "vllm":
        kwargs = {"model_dir": str(Path(args.model).resolve()), "tensor_parallel_size": max(1, per_replica)}
    else:
        kwargs = {"base_url": args.api_base, "model": args.api_model, "api_key_env": args.api_key_env,
                  "dialect": args.dialect}
    actor_cls = sampler_actor_class()
    actors = [actor_cls.options(num_cpus=args.sampler_cpus, num_gpus=per_replica, max_restarts=3)
              .remote(args.backend, kwargs) for _ in range(replicas)]
    uses_ids = ray.get([a.uses_token_ids.remote() for a in actors], timeout=600)
    log.info("%d %s sampler replica(s) ready (%d GPU each)", replicas, args.backend, per_replica)
    return RemoteSampler(actors, uses_token_ids=uses_ids[0])


def model_tokenizer(args: argparse.Namespace):
    if not args.model:
        log.warning("no --model tokenizer: inserted output tokens are estimated (3 bytes per token)")
        return None
    from mathtir.tokenizers import load_tokenizer

    return load_tokenizer(args.model)


# -- the run -------------------------------------------------------------------------------------------------

async def run_all(todo, store: RecordStore, *, sampler, executor, tokenizer, template, dialect, output_format,
                  config: TIRConfig, attempt: int, max_in_flight: int, progress) -> None:
    slots = asyncio.Semaphore(max_in_flight)

    async def one(problem, index):
        async with slots:
            record = await run_sample(problem, index, sampler=sampler, executor=executor, tokenizer=tokenizer,
                                      template=template, dialect=dialect, output_format=output_format,
                                      config=config, attempt=attempt)
        store.append(record)  # at once: a kill after this line loses nothing
        progress.update(1)

    tasks = [asyncio.ensure_future(one(problem, index)) for problem, index in todo]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def main(argv: list[str] | None = None, prog: str = "mathtir eval run") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser(prog).parse_args(argv)
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
    started = time.perf_counter()
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
        sampler_stats = exec_stats = sampling_s = None
        if todo:
            tokenizer = model_tokenizer(args)
            try:  # a known name the tokenizer cannot serve, e.g. "chat" without a chat template
                template = get_template(args.prompt_template, tokenizer=tokenizer, system=args.system)
            except ValueError as e:
                raise JobError(f"--prompt-template {args.prompt_template}: {e} (--model {args.model})") from e
            ray = init_ray(args)
            try:
                sampler = start_samplers(ray, args)
                executor = start_sandbox(ray, args)
                progress = tqdm(total=len(problems) * args.samples, initial=resumed, desc="samples",
                                disable=args.no_progress, mininterval=1 if sys.stderr.isatty() else 10,
                                file=sys.stderr)
                sampling_started = time.perf_counter()
                asyncio.run(run_all(todo, store, sampler=sampler, executor=executor, tokenizer=tokenizer,
                                    template=template, dialect=dialect, output_format=output_format,
                                    config=config, attempt=attempt, max_in_flight=args.max_in_flight,
                                    progress=progress))
                sampling_s = time.perf_counter() - sampling_started
                progress.close()
                sampler_stats, exec_stats = sampler.stats(), executor.stats()
            finally:
                ray.shutdown()
        records = [store.records[(p.id, i)] for p in problems for i in range(args.samples)]
    wall_s = time.perf_counter() - started
    # samples/s over the sampling phase alone (the wall time also holds Ray and model start-up)
    run_stats = {"wall_s": round(wall_s, 2), "sampling_s": round(sampling_s, 2) if todo else None,
                 "generated_samples": len(todo),
                 "samples_per_s": round(len(todo) / sampling_s, 4) if todo else None,
                 "sampler": sampler_stats, "sandbox": exec_stats}
    write_results(output, problems, records, args=args, run_stats=run_stats)
    manifest["attempts"][-1].update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run_stats)
    manifest["status"] = "complete"
    atomic_write_json(output / MANIFEST_FILE, manifest)
    log.info("done: %s (%s)", output / "report.md", ", ".join(f"{k}={v}" for k, v in run_stats.items()
                                                                if k in ("wall_s", "generated_samples")))
    return 0

