"""report.md of a data preparation: the funnel from records read to packed documents, verification, decontamination
and token counts, rendered from the manifest."""

from __future__ import annotations

from collections import Counter

from mathtir.data.records import DROP_REASONS


def verification_summary(counts: Counter) -> dict:
    failed = {r.removeprefix("verify_"): counts[r] for r in DROP_REASONS if r.startswith("verify_")}
    checked = counts["verified_samples"]
    return {"samples_checked": checked, "blocks_run": counts["verified_blocks"], "failed": sum(failed.values()),
            "drop_rate": sum(failed.values()) / checked if checked else 0.0, "by_reason": failed}


def render_report(manifest: dict) -> str:
    c, t = manifest["counts"], manifest["tokens"]
    lines = [f"# Data preparation report: {manifest['name']}", "",
             f"seq_length {manifest['seq_length']}, seed {manifest['seed']}, tokenizer "
             f"`{manifest['tokenizer']['path']}` (sha256 {manifest['tokenizer']['sha256'][:12]})", "",
             "## Records", "", "| step | dropped | remaining |", "|---|---:|---:|",
             f"| read | | {c['records_read']} |"]
    remaining = c["records_read"]
    for reason in DROP_REASONS:
        if c[reason]:
            remaining -= c[reason]
            lines.append(f"| {reason.replace('_', ' ')} | {c[reason]} | {remaining} |")
    lines += [f"| **packed** | | **{c['packed_documents']}** |", "",
              "Every dropped record is listed with its location and reason in `dropped.jsonl`.", ""]
    v = manifest.get("verification")
    if v:
        reasons = ", ".join(f"{k} {n}" for k, n in v["by_reason"].items() if n) or "none"
        lines += ["## Execution verification", "",
                  f"{v['samples_checked']} samples with code re-run ({v['blocks_run']} blocks): {v['failed']} "
                  f"dropped ({100 * v['drop_rate']:.2f}%; {reasons}).", ""]
    d = manifest["decontamination"]
    if d["eval_sets"]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(d["by_kind"].items())) or "none"
        lines += ["## Decontamination", "",
                  f"Against {', '.join(f'`{p}`' for p in d['eval_sets'])} ({d['ngram']}-grams at overlap >= "
                  f"{d['min_overlap']}, numbers-and-operators fingerprints, near duplicates; "
                  "docs/decontamination.md): "
                  f"{len(d['hits'])} training records dropped ({kinds}).", "",
                  "| training record | eval problem | kind | score | n-gram overlap |", "|---|---|---|---:|---:|"]
        lines += [f"| {hit['location']} | {hit['eval_set']}:{hit['eval_id']} | {hit['kind']} | {hit['score']:.2f} | "
                  f"{hit['overlap']:.2f} |" for hit in d["hits"][:50]]
        if len(d["hits"]) > 50:
            lines.append(f"- ... {len(d['hits']) - 50} more in `dropped.jsonl`")
        lines.append("")
    lines += ["## Tokens", "",
              f"- documents: {c['packed_documents']}, tokens {t['documents']} (trained on: {t['trained']}), "
              f"mean length {t['mean_document_length']:.1f}, max {t['max_document_length']}",
              f"- packed sequences: {t['sequences']}, fill {100 * t['fill']:.2f}% of {t['capacity']} slots",
              f"- shards: {len(manifest['shards'])}", ""]
    return "\n".join(lines)


