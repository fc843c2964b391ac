"""mathtir's checkpoint directory: megatron-core distributed checkpoints (torch_dist) plus the HF identity.

```
<root>/hf_config.json                      the HF config.json the model is built from (architecture truth)
<root>/tokenizer/                          tokenizer files, chat template, generation_config.json
<root>/latest_checkpointed_iteration.txt   "N", written last (after every rank finished iteration N)
<root>/iter_{N:07d}/                       dist_checkpointing torch_dist; top-level keys "model" and, from
                                           the trainer, "optimizer", "scheduler", "data", "rng", "args"
```
torch_dist checkpoints are resharded on load: a checkpoint written at one TP/PP loads at another.
`save`/`load` take the whole nested (sharded) state dict so the trainer's extra keys travel with the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mathtir import cpu_compat
from mathtir.distributed import barrier, rank

LATEST_FILE = "latest_checkpointed_iteration.txt"
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


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
        _atomic_write(root / HF_CONFIG_FILE, json.dumps(spec.hf_config, indent=2, sort_keys=True) + "\n")
        if tokenizer_src is not None and not (root / TOKENIZER_DIR).is_dir():
            tmp = root / f"{TOKENIZER_DIR}.tmp{os.getpid()}"
            copy_tokenizer_files(tokenizer_src, tmp)
            tmp.rename(root / TOKENIZER_DIR)
        if target.exists():  # left by an interrupted save of this iteration
            shutil.rmtree(target)
        target.mkdir()
    barrier()
    _collect_write_results_in_process()
    with cpu_compat.cuda_on_cpu(), _without_zip_checksums():
        dist_checkpointing.save(state, str(target), sharded_strategy=("torch_dist", 1))
    barrier()
    if rank() == 0:
        _atomic_write(root / LATEST_FILE, f"{iteration}\n")
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
    loads silently), so on the path these checkpoints are read by it protects nothing. The writer processes
    are forked inside this context and inherit it."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch always computes it
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


def _check_against_metadata(template: dict, ckpt_dir: Path, stored_shapes: dict[str, tuple[int, ...]]) -> None:
    """Name the first tensor whose key or global shape differs, before torch_dist fails obscurely."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(template.get("model", {})):
        if not isinstance(value, ShardedTensor):
            continue
        if value.key not in stored_shapes:
            raise KeyError(f"{ckpt_dir}: tensor {value.key!r} is missing (a checkpoint of another architecture?)")
        have, want = stored_shapes[value.key], tuple(value.global_shape)
        if have != want:
            raise ValueError(
                f"{ckpt_dir}: tensor {value.key!r} has shape {have} but the model expects {want} "
                "(a checkpoint of another architecture or config?)"
            )


def _iteration_to_read(root: str | Path, iteration: int | None) -> Path:
    root = Path(root)
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no {LATEST_FILE}; not a mathtir checkpoint directory")
    ckpt_dir = iteration_dir(root, iteration)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir}: missing or incomplete checkpoint (no metadata.json)")
    return ckpt_dir


def load(root: str | Path, state_template: dict, iteration: int | None = None) -> dict:
    """Load the sharded entries of `state_template` (e.g. {"model": model.sharded_state_dict()}) from
    iteration `iteration` (default: the latest) of `root`, resharding as needed. Collective."""
    from megatron.core import dist_checkpointing

    ckpt_dir = _iteration_to_read(root, iteration)
    stored = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    _check_against_metadata(state_template, ckpt_dir, {k: tuple(v.global_shape) for k, v in stored.items()})
    with cpu_compat.cuda_on_cpu():
        return dist_checkpointing.load(state_template, str(ckpt_dir))


class _CachedMetadataReader(dcp.FileSystemReader):
    """Reads the checkpoint's .metadata once, not once per dcp.load."""

    def read_metadata(self):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata()
        return self._metadata


class PartReader:
    """Reads parts of one checkpoint iteration, e.g. one layer at a time of a meta-device model's sharded
    state dict whose data were replaced by empty tensors; this process alone, no collective.

    megatron's own load cannot do this in a one-process world: it describes the parts a process does not
    read as held by "another rank", which with one rank is itself. So the regions are read here with
    torch.distributed.checkpoint directly, through megatron's factories in both directions (e.g. SwiGLU's
    fused fc1 is stored as two halves)."""

    def __init__(self, root: str | Path, iteration: int | None = None):
        self.dir = _iteration_to_read(root, iteration)
        self._reader = _CachedMetadataReader(str(self.dir))
        self._stored_shapes = {key: tuple(md.size) for key, md in self._reader.read_metadata().state_dict_metadata.items()
                               if isinstance(md, TensorStorageMetadata)}

    def read(self, state_template: dict) -> dict:
        """Load the sharded entries of `state_template`, which may cover any part of the stored tensors."""
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values
        from megatron.core.dist_checkpointing.mapping import (
            ShardedTensorFactory,
            apply_factories,
            apply_factory_merges,
        )

        factories, _ = extract_matching_values(state_template, lambda x: isinstance(x, ShardedTensorFactory),
                                               return_lists_as_dicts=True)
        apply_factories(state_template)
        _check_against_metadata(state_template, self.dir, self._stored_shapes)
        regions: list[ShardedTensor] = []

        def collect(value):
            if not isinstance(value, ShardedTensor):
                raise TypeError(f"PartReader reads tensors only, not {type(value).__name__} {getattr(value, 'key', '')}")
            regions.append(value)
            return value

        dict_list_map_inplace(collect, state_template)
        dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(regions), no_dist=True)
        loaded = dict_list_map_inplace(lambda sh_ten: sh_ten.data, state_template)
        return apply_factory_merges(loaded, factories)


class _RegionLoadPlanner(LoadPlanner):
    """A torch.distributed.checkpoint load planner that fills each megatron ShardedTensor's data with its
    region (global offset, local shape; layers as a prepended axis) of the stored global tensor."""

    def __init__(self, regions: list):
        self.by_key: dict[str, list] = {}
        for sh_ten in regions:
            self.by_key.setdefault(sh_ten.key, []).append(sh_ten)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, sh_tens in self.by_key.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(t.global_offset), sizes=torch.Size(self._view(t).shape))
                      for t in sh_tens]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, new_plan):
        return new_plan

    def load_bytes(self, read_item, value) -> None:
        raise ValueError(f"{read_item.dest_index.fqn}: stored as bytes, not as a tensor")

    def resolve_tensor(self, read_item):
        target = self._view(self.by_key[read_item.dest_index.fqn][read_item.dest_index.index])
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            target = target.narrow(dim, offset, length)
        return target

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place

    @staticmethod
    def _view(sh_ten):
        return sh_ten.data.view((1,) * sh_ten.prepend_axis_num + tuple(sh_ten.local_shape))


def model_sharded_state_dict(chunks: list) -> dict:
    """The "model" entry for a rank's model chunks (one per virtual pipeline stage)."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"vp{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_model(root: str | Path, chunks: list, iteration: int | None = None) -> None:
    """Load only the weights of `root` (latest iteration by default) into `chunks` in place."""
    loaded = load(root, {"model": model_sharded_state_dict(chunks)}, iteration)["model"]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"vp{i}"])


def stored_dtype(root: str | Path, iteration: int | None = None) -> torch.dtype:
    """The dtype the model weights were saved in (bf16 from training, fp32/bf16 from import)."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"{root}: no {LATEST_FILE}; not a mathtir checkpoint directory")
    meta = dist_checkpointing.load_tensors_metadata(str(iteration_dir(root, iteration)))
    key = "embedding.word_embeddings.weight"
    if key not in meta:
        raise KeyError(f"{iteration_dir(root, iteration)}: no {key!r}; not a GPT checkpoint")
    return meta[key].dtype
