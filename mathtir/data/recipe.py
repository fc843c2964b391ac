"""Data recipes (nemo_configs/data_*.yaml): the schema, loading with ``key=value`` overrides, validation.

Like the training recipes, the schema is the single list of accepted keys: a misspelt key is an error, never a
silent default. Paths are relative to the working directory (the repository root for the shipped recipes).
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf

from mathtir.formats import TEMPLATE_NAMES
from mathtir.recipes import check, load_structured


@dataclass
class FieldsConfig:
    """Input field names (OpenMathReasoning defaults). ``messages`` replaces problem/response when set."""

    problem: str | None = "problem"
    response: str | None = "generated_solution"
    expected_answer: str | None = "expected_answer"  # null: the answer filter cannot run and is skipped
    mode: str | None = None  # e.g. inference_mode; needed by filters.modes
    messages: str | None = None


@dataclass
class TemplateConfig:
    name: str = "llmjp"  # mathtir.formats.get_template: llmjp | chat | llama3 | chatml
    system: str | None = None  # null: the template's default system line


@dataclass
class FiltersConfig:
    modes: list[str] | None = None  # keep only records whose `mode` field is one of these
    require_code: bool = False  # TIR sets: drop samples without a code block
    code_output_pairs: bool = True  # every code block is followed by an output block
    no_boxed_before_code: bool = True  # no \boxed answer before the first code block
    answer_matches: bool = True  # the response's last \boxed{} is equivalent to expected_answer


@dataclass
class VerifyConfig:
    enabled: bool = False  # re-run every code block through the sandbox and compare the recorded outputs
    workers: int = 2  # sandbox workers per part, shared out over its processes (at least one each)
    timeout_s: float = 10.0  # per code block
    memory_mb: int = 1024
    float_rel_tol: float = 1e-6  # numbers in outputs compare with this relative tolerance
    output_max_chars: int = 1000  # recorded outputs cut at this length by the generating sandbox also match
    allow_degraded: bool = False  # passed to SandboxPool (only where bwrap cannot run; never for real data)


@dataclass
class MinHashConfig:
    """MinHash + LSH near-duplicate search (mathtir.data.clean) over character shingles. Its keys sit directly
    in the sections that search (dedup, decontam: no extra YAML level), each with its own defaults, set in
    DataRecipe."""

    near_threshold: float = MISSING  # estimated Jaccard similarity of character shingles
    num_perm: int = MISSING  # MinHash permutations
    bands: int = MISSING  # LSH bands; must divide num_perm
    shingle: int = MISSING  # characters per shingle


@dataclass
class DedupConfig(MinHashConfig):
    exact: bool = True  # same (problem, response) after normalization
    near: bool = False  # MinHash + LSH near duplicates of the (problem, response) text


@dataclass
class DecontamConfig(MinHashConfig):
    eval_sets: list[str] = field(default_factory=list)  # JSONL/Parquet files with `id` and `problem` fields
    id_field: str = "id"
    problem_field: str = "problem"
    ngram: int = 13  # words; a CJK character is one word
    min_overlap: float = 0.5  # share of an eval problem's n-grams found in a training problem
    # the numbers-and-operators fingerprint (survives rewording and translation; docs/decontamination.md)
    fingerprint: bool = True
    fingerprint_min_tokens: int = 3  # numbers above 10 plus operators an eval problem needs to be fingerprinted
    fingerprint_min_digits: int = 5  # significant digits those numbers must carry together
    fingerprint_min_share: float = 0.5  # share of the training text's numbers above 10 that are the eval problem's
    near_duplicate: bool = True  # MinHash near duplicates of eval problems (same numbers in the same order)


@dataclass
class PackConfig:
    rows_per_shard: int = 2048
    row_group_size: int = 32  # the loader reads one row group at a time


@dataclass
class DataRecipe:
    name: str = MISSING
    inputs: list[str] = MISSING  # files, glob patterns of files, or HF save_to_disk directories
    input_format: str = "auto"  # auto | jsonl | json | parquet | hf_disk
    output_dir: str = MISSING
    tokenizer: str = MISSING  # a local HF tokenizer directory (fast tokenizer)
    seq_length: int = 4096
    seed: int = 1234
    template: TemplateConfig = field(default_factory=TemplateConfig)
    dialect: str = "tir"  # tir | openmath
    train_on_outputs: bool = True  # the reference trains on output blocks too
    skip_invalid: bool = False  # count and list bad records instead of stopping at the first
    workers: int = 0  # tokenizing/filtering processes; 0 = all cores
    batch_size: int = 256  # records per worker task
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    dedup: DedupConfig = field(
        default_factory=lambda: DedupConfig(near_threshold=0.9, num_perm=64, bands=16, shingle=5))
    decontam: DecontamConfig = field(
        default_factory=lambda: DecontamConfig(near_threshold=0.5, num_perm=128, bands=32, shingle=3))
    pack: PackConfig = field(default_factory=PackConfig)


FORMATS = ("auto", "jsonl", "json", "parquet", "hf_disk")
DIALECTS = ("tir", "openmath")


def load_data_recipe(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    cfg = load_structured(path, DataRecipe, overrides, schema_home="mathtir/data/recipe.py")
    validate(cfg, str(path))
    return cfg


def validate(cfg: DictConfig, source: str) -> None:
    check(len(cfg.inputs) > 0, source, "inputs", "needs at least one input")
    check(cfg.input_format in FORMATS, source, "input_format", f"'{cfg.input_format}' is not one of {FORMATS}")
    check(cfg.dialect in DIALECTS, source, "dialect", f"'{cfg.dialect}' is not one of {DIALECTS}")
    check(cfg.template.name in TEMPLATE_NAMES, source, "template.name",
          f"'{cfg.template.name}' is not one of {TEMPLATE_NAMES}")
    check(cfg.seq_length >= 2, source, "seq_length", "must be >= 2")
    check(cfg.workers >= 0 and cfg.batch_size >= 1, source, "workers", "workers must be >= 0 and batch_size >= 1")
    check(cfg.fields.messages is not None or (cfg.fields.problem and cfg.fields.response), source, "fields",
          "set fields.problem and fields.response, or fields.messages")
    check(cfg.filters.modes is None or cfg.fields.mode is not None, source, "filters.modes", "needs fields.mode")
    check(cfg.verify.workers >= 1 and cfg.verify.timeout_s > 0, source, "verify", "workers >= 1 and timeout_s > 0")
    _validate_minhash(cfg.dedup, source, "dedup")
    d = cfg.decontam
    check(d.ngram >= 1 and 0 < d.min_overlap <= 1, source, "decontam", "ngram >= 1 and min_overlap in (0, 1]")
    check(d.fingerprint_min_tokens >= 1 and d.fingerprint_min_digits >= 0, source, "decontam.fingerprint_min_tokens",
          "fingerprint_min_tokens >= 1 and fingerprint_min_digits >= 0")
    check(0 < d.fingerprint_min_share <= 1, source, "decontam.fingerprint_min_share", "must be in (0, 1]")
    _validate_minhash(d, source, "decontam")
    check(cfg.pack.rows_per_shard >= 1 and cfg.pack.row_group_size >= 1, source, "pack", "sizes must be >= 1")



def _validate_minhash(section: DictConfig, source: str, name: str) -> None:
    """The MinHashConfig keys of the recipe section `name`."""
    check(0 < section.near_threshold <= 1, source, f"{name}.near_threshold", "must be in (0, 1]")
    check(section.shingle >= 1 and section.bands >= 1 and section.num_perm % section.bands == 0, source,
          f"{name}.bands", "shingle >= 1, and bands must divide num_perm")


# Keys that change how the work is done but not its result: a part written with other values is reused.
_EXECUTION_ONLY = ("workers", "batch_size", "name")


def fingerprint(cfg: DictConfig) -> str:
    """Identity of everything that determines the shards (config + input file sizes and mtimes)."""
    content = OmegaConf.to_container(cfg, resolve=True)
    for key in _EXECUTION_ONLY:
        content.pop(key, None)
    content["verify"] = {k: v for k, v in content["verify"].items() if k != "workers"}
    stats = []
    for path in (path for p in content["inputs"] for path in expand_input(p)):
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        stats.append([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])
    return hashlib.sha256(json.dumps([content, stats], sort_keys=True).encode()).hexdigest()


def expand_input(entry: str) -> list[Path]:
    """The existing paths one `inputs` entry names: itself, or a glob pattern's matches in sorted order (the
    part files of a sharded source, e.g. `mathtir generate`'s solutions/part-*.jsonl)."""
    if any(c in entry for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(entry))]
    return [Path(entry)] if Path(entry).exists() else []
