"""mathtir's checkpoint directory: megatron-core distributed checkpoints (torch_dist) plus the HF identity.

```
<root>/hf_config.json                      the HF config.json the model is built from (architecture truth)
<root>/tokenizer/                          tokenizer files, chat template, generation_config.json
<root>/latest_checkpointed_iteration.txt   "N", written last (after every rank finished iteration N)
<root>/iter_{N:07d}/                       dist_checkpointing torch_dist; top-level keys "model" and, from
                                           the trainer, "optimizer", "scheduler", "data", "rng", "args"
<root>/iter_{N:07d}/checksums.json         size and XXH3 of every file above, hashed by the rank that wrote it
```
torch_dist checkpoints are resharded on load: a checkpoint written at one TP/PP loads at another.
`save`/`load` take the whole nested (sharded) state dict so the trainer's extra keys travel with the model.

Between layer specs: Transformer Engine modules carry an `_extra_state` (FP8 scaling history) that megatron's
local spec, the importer and CPU runs do not write for every module: TE's attention core declares it in
`state_dict()` but never saves it, and a TE module with no local counterpart asks for it in its sharded
state dict. `load` and `load_into` tolerate exactly that absence (those modules keep their fresh extra
state, and the load says so on rank 0); any other missing entry is an error. A TE-written checkpoint loads
into the local spec as it is (entries the template does not ask for are not read).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

from mathtir.files import atomic_write_json, atomic_write_text
from mathtir.megatron.parallel import barrier, rank

log = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "xxh3_64"
HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
# What an HF export needs besides weights and config.json (whichever of them the source has).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    path = Path(root) / LATEST_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer/chat-template/generation-config files `src` has; returns the names copied."""
    src, dst = Path(src), Path(dst)
    if (src / TOKENIZER_DIR).is_dir() and (src / HF_CONFIG_FILE).is_file():
        src = src / TOKENIZER_DIR  # a mathtir checkpoint root
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save(root: str | Path, iteration: int, state: dict, *, spec, tokenizer_src: str | Path | None = None) -> Path:
    """Collective: every rank calls it with its own sharded state dict. Returns the iteration directory.

    The latest-iteration file is updated only after all ranks finished writing, so an interrupted save
    leaves the previous iteration as the one a resume picks up.
    """
    from megatron.core import dist_checkpointing

    if "model" not in state:
        raise KeyError("checkpoint state must have a 'model' entry")
    root = Path(root)
    target = iteration_dir(root, iteration)
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / HF_CONFIG_FILE, json.dumps(spec.hf_config, indent=2, sort_keys=True) + "\n")
        if tokenizer_src is not None and not (root / TOKENIZER_DIR).is_dir():
            tmp = root / f"{TOKENIZER_DIR}.tmp{os.getpid()}"
            copy_tokenizer_files(tokenizer_src, tmp)
            tmp.rename(root / TOKENIZER_DIR)
        if target.exists():  # left by an interrupted save of this iteration
            shutil.rmtree(target)
        target.mkdir()
    barrier()
    _collect_write_results_in_process()
    with _without_zip_checksums():
        dist_checkpointing.save(state, str(target), sharded_strategy=("torch_dist", 1))
    barrier()
    _write_checksums(target)
    if rank() == 0:
        atomic_write_text(root / LATEST_FILE, f"{iteration}\n")
    barrier()
    return target


def _collect_write_results_in_process() -> None:
    """megatron-core's torch_dist writer returns its results through a queue served by a *spawned* manager
    process, which must import torch to unpickle them: ~2 s on the first save of every process, eight times
    what writing SmolLM2 takes. Our saves are synchronous (dist_checkpointing.save without async_sharded_save):
    the results are put and taken by this process, so an in-process queue carries them. An async save
    would need the manager's queue (the writer runs in another process): do not add one without removing
    this. Left alone where megatron-core keeps the queue differently."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()


def _without_zip_checksums():
    """torch_dist writes each tensor with torch.save, which computes a CRC32 of its bytes on one core: most
    of a save's time where the disk is fast (~1.4 GB/s here). torch.load never checks it (a flipped byte
    loads silently), so on the path these checkpoints are read by it protects nothing: integrity is
    checksums.json instead (XXH3 of whole files, checked at every read). The writer processes are
    forked inside this context and inherit it."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch always computes it
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


class CheckpointDamagedError(ValueError):
    """A checkpoint file that is missing, or whose size or hash differs from what its writer recorded."""


def file_checksum(path: Path) -> dict:
    """{"size", "xxh3_64"} of a file. XXH3 because it hashes ~10 GB/s on one core (zlib's CRC32: ~2), which
    keeps a save's and an export's extra read of the checkpoint small; what a checkpoint needs is to catch
    damage, not forgery."""
    import xxhash

    digest, size = xxhash.xxh3_64(), 0
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buffer):
            digest.update(view[:got])
            size += got
    return {"size": size, ALGORITHM: digest.hexdigest()}


def _world() -> tuple[int, int]:
    import torch

    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    import torch

    _, world = _world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


_WRITER_FILE = re.compile(r"__(\d+)_\d+\.distcp")


def _write_checksums(ckpt_dir: Path) -> None:
    """Collective, after every rank's writer finished: each rank hashes the data files it wrote (torch_dist
    names them __RANK_N.distcp; they are still in the page cache), rank 0 also the metadata it wrote, and
    rank 0 records them all. Written before the latest-iteration file, so a checkpoint a resume or an export
    picks up always has its checksums."""
    me, _ = _world()
    mine = {}
    for path in sorted(ckpt_dir.iterdir()):
        if not path.is_file() or path.name == CHECKSUMS_FILE:
            continue
        writer = _WRITER_FILE.fullmatch(path.name)
        if (int(writer.group(1)) if writer else 0) == me:
            mine[path.name] = file_checksum(path)
    files = {name: entry for part in _gather(mine) for name, entry in part.items()}
    if me == 0:
        atomic_write_json(ckpt_dir / CHECKSUMS_FILE, {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))})


_verified: set[tuple[Path, int]] = set()  # (iteration dir, checksums.json mtime) already checked by this process


def verify_checksums(ckpt_dir: Path) -> None:
    """Collective where torch.distributed is initialized: the files of `ckpt_dir` against its checksums.json,
    each file hashed by one rank; every rank raises CheckpointDamagedError naming the damaged files. A
    checkpoint written before checksums existed is read with a warning."""
    manifest_path = ckpt_dir / CHECKSUMS_FILE
    if not manifest_path.is_file():
        log.warning("%s: no %s (written before checkpoints carried checksums): its files are not checked",
                    ckpt_dir, CHECKSUMS_FILE)
        return
    key = (ckpt_dir.resolve(), manifest_path.stat().st_mtime_ns)
    if key in _verified:
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest["algorithm"] != ALGORITHM:
            raise ValueError(f"algorithm {manifest['algorithm']!r}, this version checks {ALGORITHM!r}")
        expected = {str(name): (int(entry["size"]), str(entry[ALGORITHM]))
                    for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointDamagedError(f"{manifest_path}: unreadable checksum list ({type(e).__name__}: {e})") from e
    me, world = _world()
    problems = []
    for i, (name, (size, digest)) in enumerate(sorted(expected.items())):
        if i % world != me:
            continue
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        have_size = path.stat().st_size
        if have_size != size:
            problems.append(f"{path}: {have_size} bytes, {size} when written (truncated or overwritten)")
            continue
        have = file_checksum(path)[ALGORITHM]
        if have != digest:
            problems.append(f"{path}: {ALGORITHM} {have}, {digest} when written (damaged content)")
    problems = sorted(p for part in _gather(problems) for p in part)
    if problems:
        raise CheckpointDamagedError(f"damaged checkpoint, refused ({len(problems)} file(s)): " + "; ".join(problems))
    _verified.add(key)


EXTRA_STATE_SUFFIX = "_extra_state"  # megatron's name for TE modules' extra state (transformer/utils.py)


def _check_against_metadata(template: dict, stored: dict, stored_keys: set[str], ckpt_dir: Path) -> None:
    """Name the first model entry whose key or global shape differs, before torch_dist fails obscurely."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(template.get("model", {})):
        if isinstance(value, ShardedObject) and value.key not in stored_keys:
            raise KeyError(f"{ckpt_dir}: object {value.key!r} is missing (a checkpoint of another architecture?)")
        if not isinstance(value, ShardedTensor):
            continue
        if value.key not in stored:
            raise KeyError(f"{ckpt_dir}: tensor {value.key!r} is missing (a checkpoint of another architecture?)")
        have, want = tuple(stored[value.key].global_shape), tuple(value.global_shape)
        if have != want:
            raise ValueError(
                f"{ckpt_dir}: tensor {value.key!r} has shape {have} but the model expects {want} "
                "(a checkpoint of another architecture or config?)"
            )


def iteration_to_read(root: str | Path, iteration: int | None) -> Path:
    """The iteration directory to read (default: the latest), its files checked against their checksums
    (collective where torch.distributed is initialized)."""
    root = Path(root)
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no {LATEST_FILE}; not a mathtir checkpoint directory")
    ckpt_dir = iteration_dir(root, iteration)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir}: missing or incomplete checkpoint (no metadata.json)")
    verify_checksums(ckpt_dir)
    return ckpt_dir


def load(root: str | Path, state_template: dict, iteration: int | None = None) -> dict:
    """Load the sharded entries of `state_template` (e.g. {"model": model.sharded_state_dict()}) from
    iteration `iteration` (default: the latest) of `root`, resharding as needed. Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    ckpt_dir = iteration_to_read(root, iteration)
    stored = load_sharded_metadata(str(ckpt_dir))  # tensors by key, objects by key/shard_...
    stored_keys = set(stored) | {value.key for value in stored.values()}
    kept: list[tuple[tuple, object]] = []
    template = _without_absent_extra_state(state_template, stored_keys, kept)
    _report_fresh_extra_state(ckpt_dir, [path[-1] for path, _ in kept])
    _check_against_metadata(template, stored, stored_keys, ckpt_dir)
    loaded = dist_checkpointing.load(template, str(ckpt_dir))
    for path, data in kept:  # so load_state_dict finds every key the modules declare
        node = loaded
        for name in path[:-1]:
            node = node[name]
        node[path[-1]] = data
    return loaded


def _report_fresh_extra_state(source, keys: list[str]) -> None:
    if keys and rank() == 0:
        print(f"mathtir: {source} has no Transformer Engine {EXTRA_STATE_SUFFIX} for {len(keys)} module(s) "
              f"(written by the local layer spec, e.g. by the importer or a CPU run); those modules keep "
              f"their fresh extra state (no FP8 scaling history), e.g. {keys[0]}", file=sys.stderr, flush=True)


def _without_absent_extra_state(node, stored_keys: set[str], kept: list, path: tuple = ()):
    """`node` (a nested template) without the TE extra-state objects the checkpoint lacks; each dropped one's
    (path, the module's own current value) is appended to `kept`."""
    from megatron.core.dist_checkpointing import ShardedObject

    if not isinstance(node, dict):
        return node
    out = {}
    for name, value in node.items():
        if (isinstance(value, ShardedObject) and value.key.endswith(EXTRA_STATE_SUFFIX)
                and value.key not in stored_keys):
            kept.append(((*path, name), value.data))
            continue
        out[name] = _without_absent_extra_state(value, stored_keys, kept, (*path, name))
    return out


# fully_reshardable: the optimizer state can be loaded at another TP/PP (dp_reshardable cannot);
# mem_efficient: gathered over gloo onto DP rank 0 only, not onto every rank (memory).
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable",
                    "distrib_optim_fully_reshardable_mem_efficient": True}
OPTIMIZER_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


def optimizer_sharded_state_dict(optimizer, model_state: dict, *, loading: bool) -> dict:
    """The "optimizer" entry: megatron's distributed optimizer state in its fully reshardable format.

    To save it, megatron gathers each state (main param, exp_avg, exp_avg_sq) of the data-parallel group onto
    one flat buffer per state and hands out per-parameter views of it; the checkpoint writer then clones every
    view. With a data-parallel group of one rank, the optimizer's own tensors already hold each parameter
    whole, and that gather-and-clone is pure copying: 1.5 GiB above the step's peak for each of the demo's
    three ranks (SmolLM2, TP=3), more than the step itself. Such a rank hands the writer its own tensors, in
    the same checkpoint entries (keys, shapes, fp32, replica ids) megatron's gather would write.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])  # a ChainedOptimizer of one delegates to it
    own = chained[0] if len(chained) == 1 and isinstance(chained[0], DistributedOptimizer) else None
    if loading or own is None or own.data_parallel_group.size() != 1 or (
            param_state := _own_param_state(own, model_state)) is None:
        return optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=OPTIMIZER_FORMAT)
    state = own.state_dict()
    state["param_state"] = param_state
    state["param_state_sharding_type"] = OPTIMIZER_FORMAT["distrib_optim_sharding_type"]
    return state


def _own_param_state(optimizer, model_state: dict) -> dict | None:
    """Megatron's `sharded_param_state_fully_reshardable` entries (same order, keys and metadata) built on the
    optimizer's own state tensors; None when a parameter's state is missing or not whole on this rank."""
    from dataclasses import replace

    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    sharded, _ = extract_sharded_tensors_and_factories(model_state)
    metadata_of = {entry.data: entry for entry in nested_values(sharded)}
    out = {}
    for buffer in optimizer.buffers:
        for model_param in buffer.param_index_map:
            tensors = optimizer._get_main_param_and_optimizer_states(model_param)
            if any(key not in tensors or tensors[key].numel() != model_param.numel() for key in OPTIMIZER_STATE_KEYS):
                return None
            meta = metadata_of[model_param]
            entries = {}
            for key in OPTIMIZER_STATE_KEYS:
                data = tensors[key].detach().to(torch.float32).view(meta.data.shape)  # gathered buffers are fp32
                fields = dict(key=f"optimizer.state.{key}.{meta.key}", data=data, replica_id=meta.replica_id)
                if not isinstance(meta, ShardedTensorFactory):
                    fields["dtype"] = data.dtype
                entries[key] = replace(meta, **fields)
                entries[key].validate_metadata_integrity()
            out[len(out)] = entries
    return out


def model_sharded_state_dict(chunks: list) -> dict:
    """The "model" entry for a rank's model chunks (one per virtual pipeline stage)."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"vp{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_model(root: str | Path, chunks: list, iteration: int | None = None) -> None:
    """Load only the weights of `root` (latest iteration by default) into `chunks` in place."""
    load_into(chunks, load(root, {"model": model_sharded_state_dict(chunks)}, iteration)["model"], root)


def load_into(chunks: list, loaded_model: dict, source) -> None:
    """`load_state_dict` of the loaded "model" entry into each chunk, strictly except for the extra state
    of modules that declare it only in `state_dict()` (TE's attention core): when the checkpoint has none,
    they keep their own."""
    fresh = []
    for i, chunk in enumerate(chunks):
        state = dict(loaded_model if len(chunks) == 1 else loaded_model[f"vp{i}"])
        for key, value in chunk.state_dict(keep_vars=True).items():
            # None: megatron's own linears, whose load hook supplies an empty one
            if key.endswith(EXTRA_STATE_SUFFIX) and key not in state and value is not None:
                state[key] = value
                fresh.append(key)
        chunk.load_state_dict(state)
    _report_fresh_extra_state(source, fresh)


def resolve_root(ckpt: str | Path) -> tuple[Path, int | None]:
    """Accept a checkpoint root or one of its iter_N directories."""
    ckpt = Path(ckpt)
    if ckpt.name.startswith("iter_") and (ckpt.parent / HF_CONFIG_FILE).is_file():
        return ckpt.parent, int(ckpt.name.removeprefix("iter_"))
    if not (ckpt / HF_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{ckpt}: no {HF_CONFIG_FILE}; not a mathtir checkpoint root")
    return ckpt, None
