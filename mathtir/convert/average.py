"""Checkpoint averaging: the element-wise mean of the weights of several checkpoints, written as a new
checkpoint (weights only, like an import) that exports, verifies, evaluates and initialises a later stage like
any other.

The inputs are a run's last K checkpoints, named iterations of a run, or iter_N directories of several runs of
the same model. Every input's hf_config.json must equal the first's (a differing field is refused by name), and
every stored weight must have the shape the model expects (a differing tensor is refused by key). Each input
is loaded into this rank's model chunks at the TP/PP the command runs at (torch_dist reshards on load, as the
trainer's load does), summed in fp32 and divided once, then rounded to the inputs' stored dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mathtir.megatron import checkpoint


@dataclass(frozen=True)
class Source:
    root: Path
    iteration: int

    @property
    def dir(self) -> Path:
        return checkpoint.iteration_dir(self.root, self.iteration)


def saved_iterations(root: Path) -> list[int]:
    """The complete iterations of a checkpoint root, oldest first (an interrupted save has no metadata.json)."""
    found = []
    for d in root.glob("iter_*"):
        suffix = d.name.removeprefix("iter_")
        if suffix.isdigit() and (d / "metadata.json").is_file():
            found.append(int(suffix))
    return sorted(found)


def select_sources(ckpts: list[str], *, last: int | None = None, iterations: list[int] | None = None) -> list[Source]:
    """What to average: one run root with `last` or `iterations`, or several iter_N directories."""
    resolved = [checkpoint.resolve_root(c) for c in ckpts]
    if last is not None or iterations is not None:
        if len(resolved) != 1 or resolved[0][1] is not None:
            raise ValueError("--last / --iterations select from one checkpoint root: give exactly one --ckpt that "
                             "is a run's root, not an iter_N directory")
        root = resolved[0][0]
        available = saved_iterations(root)
        if last is not None:
            if last < 2 or last > len(available):
                raise ValueError(f"--last {last}: {root} holds {len(available)} complete checkpoint(s) "
                                 f"{available}; averaging needs 2..{len(available)}")
            chosen = available[-last:]
        else:
            missing = [i for i in iterations if i not in available]
            if missing:
                raise ValueError(f"--iterations: {root} has no complete checkpoint for iteration(s) {missing} "
                                 f"(it holds {available})")
            chosen = sorted(set(iterations))
        sources = [Source(root, i) for i in chosen]
    else:
        if any(iteration is None for _, iteration in resolved):
            raise ValueError("give --last K or --iterations with a run's root, or --ckpt iter_N directories only")
        sources = [Source(root, iteration) for root, iteration in resolved]
    if len(set(sources)) < 2:
        raise ValueError(f"averaging needs at least two distinct checkpoints, got {[str(s.dir) for s in sources]}")
    for s in sources:
        checkpoint.iteration_to_read(s.root, s.iteration)  # complete, or refused naming the directory
    check_same_config(sources)
    return sources


def check_same_config(sources: list[Source]) -> None:
    """Refuse inputs whose HF configs differ, naming the first field that does."""
    first_path = sources[0].root / checkpoint.HF_CONFIG_FILE
    first = json.loads(first_path.read_text())
    for s in sources[1:]:
        path = s.root / checkpoint.HF_CONFIG_FILE
        other = json.loads(path.read_text())
        for key in sorted(set(first) | set(other)):
            if first.get(key, "<absent>") != other.get(key, "<absent>"):
                raise ValueError(f"{path}: {key}={other.get(key, '<absent>')!r} but {first_path} has "
                                 f"{first.get(key, '<absent>')!r}; checkpoints of different models cannot be averaged")


def stored_dtype(source: Source) -> torch.dtype:
    """The dtype the input's weights are stored in (the average is written in it too)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(source.dir))
    return metadata["embedding.word_embeddings.weight"].dtype


def average(sources: list[Source], out: str | Path) -> Path:
    """Collective (every rank of the TP/PP world): write mean(sources) to `out` at the last input's iteration."""
    from mathtir.megatron.model import build_model
    from mathtir.models.llama import ModelSpec

    spec = ModelSpec.from_dir(sources[0].root)
    chunks = build_model(spec, params_dtype=stored_dtype(sources[0]), perform_initialization=False,
                         attention_backend="local")
    sums = None
    for source in sources:
        checkpoint.load_model(source.root, chunks, source.iteration)
        weights = _weights(chunks)
        if sums is None:
            sums = [w.to(torch.float32, copy=True) for w in weights]
        else:
            for total, w in zip(sums, weights, strict=True):
                total.add_(w.to(torch.float32))
    for w, total in zip(_weights(chunks), sums, strict=True):
        w.copy_(total.div_(len(sources)))
    state = {"model": checkpoint.model_sharded_state_dict(chunks),
             "averaged_from": [{"root": str(s.root), "iteration": s.iteration} for s in sources]}
    return checkpoint.save(out, sources[-1].iteration, state, spec=spec, tokenizer_src=sources[0].root)


def _weights(chunks: list) -> list[torch.Tensor]:
    """The chunks' floating-point state, as tensors sharing the parameters' storage (writing them sets them)."""
    return [t for chunk in chunks for t in chunk.state_dict().values()
            if isinstance(t, torch.Tensor) and torch.is_floating_point(t)]
