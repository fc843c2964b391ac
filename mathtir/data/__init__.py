"""SFT data pipeline: raw CoT/TIR sets -> verified, deduplicated, decontaminated, tokenized, packed shards.

Modules: config (the data recipe schema, nemo_configs/data_*.yaml), readers (JSONL/Parquet/HF-on-disk
records), clean (dedup keys, decontamination index), verify (re-execution through the sandbox), pack (bin
packing + Parquet shards), prepare (per-record filters, tokenization, the part/merge orchestration, manifest
and report), loader (what the trainer reads), demo (synthetic Japanese arithmetic data).
Entry point: ``python -m mathtir.data {prepare,merge,demo} ...`` (see __main__.py); on Slurm,
``slurm/prepare_data.sh``.
"""
