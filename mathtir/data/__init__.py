"""SFT data: raw CoT/TIR sets -> verified, deduplicated, decontaminated, tokenized, packed shards.

The recipe (recipe), records and their drop reasons (records), per-record work (process), phase 1 per part
(part), phase 2 (merge), report.md (report), dedup and decontamination indexes (clean), re-execution through
the sandbox (verify), bin packing (pack), synthetic demo data (demo). `mathtir data` (cli) is the entry point;
on Slurm, `slurm/prepare_data.sh`. The shards' format is mathtir.shards, which the trainer reads.
"""
