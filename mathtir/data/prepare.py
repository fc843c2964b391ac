"""``prepare``: raw records -> cleaned, tokenized documents (phase 1, mathtir.data.part) -> deduplicated, packed
shards (phase 2, mathtir.data.merge). A Slurm array job runs phase 1 per part and phase 2 once
(slurm/prepare_data.sh); on one machine `prepare` runs both.
"""

from __future__ import annotations

from omegaconf import DictConfig

from mathtir.data.merge import merge
from mathtir.data.part import prepare_part


def prepare(cfg: DictConfig) -> dict:
    prepare_part(cfg, 0, 1)
    return merge(cfg, 1)
