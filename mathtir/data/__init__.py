"""SFT data pipeline: raw CoT/TIR sets -> verified, deduplicated, decontaminated, tokenized, packed shards.

Stages (one module each): readers (JSONL/Parquet/HF-on-disk records), clean (structural filters, dedup,
decontamination), verify (re-execution through the sandbox), pack (tokenize + bin packing + shards),
prepare (the orchestration, manifest and report), loader (what the trainer reads), demo (synthetic data).
Entry point: ``python -m mathtir.data prepare <config> [key=value ...]``.
"""
