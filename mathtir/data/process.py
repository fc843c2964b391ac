"""Per-record work of phase 1: mode selection, structural filters, answer check, decontamination, rendering
(mathtir.formats) and tokenization. A RecordProcessor is built once per part and inherited by the forked
slice processes; it turns a batch of records into Documents (kept) and Drops (with their reason).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mathtir.data.clean import DecontaminationIndex, MinHasher, exact_key
from mathtir.data.records import Drop, Record
from mathtir.recipes import ConfigError


@dataclass
class Document:
    source: int
    index: int
    location: str
    key: bytes
    signature: np.ndarray | None
    input_ids: np.ndarray  # int32
    trained: np.ndarray  # int8 per token: 1 = a response token that is trained on
    blocks: list[tuple[str, str]]  # (code, recorded output) pairs, for execution verification


class RecordProcessor:
    """Everything done to one record before verification; built once and inherited by forked workers."""

    def __init__(self, cfg: DictConfig, tokenizer, decontam: DecontaminationIndex | None):
        from mathtir.formats import get_dialect, get_template

        # Plain values: OmegaConf attribute access is slow enough to show up per record.
        self.filters = OmegaConf.to_object(cfg.filters)
        self.seq_length = int(cfg.seq_length)
        self.train_on_outputs = bool(cfg.train_on_outputs)
        try:  # a known name the tokenizer cannot serve, e.g. "chat" without a chat template
            self.template = get_template(cfg.template.name, tokenizer=tokenizer, system=cfg.template.system)
        except ValueError as e:
            raise ConfigError(f"key 'template.name': {e} (tokenizer {cfg.tokenizer})") from e
        self.dialect = get_dialect(cfg.dialect)
        self.backend = tokenizer.backend_tokenizer
        self.decontam = decontam
        self.minhasher = (MinHasher(cfg.dedup.num_perm, cfg.dedup.shingle, seed=cfg.seed)
                          if cfg.dedup.near else None)
        self.modes = set(self.filters.modes) if self.filters.modes is not None else None

    def _structural(self, record: Record) -> tuple[str | None, str | None, list[tuple[str, str]]]:
        """(drop reason, detail, code/output pairs)."""
        from mathtir.formats import parse_response

        f = self.filters
        segments = [s for s in parse_response(record.response, self.dialect)
                    if s.kind != "text" or s.text.strip()]
        blocks: list[tuple[str, str]] = []
        for k, segment in enumerate(segments):
            if segment.kind == "code":
                following = segments[k + 1] if k + 1 < len(segments) else None
                if following is None or following.kind != "output" or not following.closed:
                    if f.code_output_pairs:
                        return "code_without_output", f"code block at character {segment.start}", []
                    continue
                blocks.append((segment.text, following.text))
        if f.require_code and not blocks:
            return "no_code", None, []
        if f.no_boxed_before_code and blocks:
            first_code = next(s.start for s in segments if s.kind == "code")
            if "\\boxed" in record.response[:first_code]:
                return "boxed_before_code", None, []
        if f.answer_matches and record.expected_answer is not None:
            from mathtir.answers import extract_answer, is_equivalent

            # The model's own answer: a box that executed code printed into an output block is not it.
            outputs = [(s.start, s.end) for s in segments if s.kind == "output"]
            answer = extract_answer(record.response, ignore_spans=outputs)
            if answer is None:
                return "no_answer", None, []
            if not is_equivalent(answer, record.expected_answer):
                return "wrong_answer", f"{answer!r} vs expected {record.expected_answer!r}", []
        return None, None, blocks

    def __call__(self, records: list[Record]) -> list[Document | Drop]:
        from mathtir.formats import render_example

        out: list[Document | Drop | None] = []
        texts, spans, pending = [], [], []
        for record in records:
            if self.modes is not None and record.mode not in self.modes:
                out.append(Drop(record.source, record.index, record.location, "mode_not_selected", record.mode))
                continue
            reason, detail, blocks = self._structural(record)
            if reason is not None:
                out.append(Drop(record.source, record.index, record.location, reason, detail))
                continue
            if self.decontam is not None:
                hit = self.decontam.check(record.problem)
                if hit is not None:
                    out.append(Drop(record.source, record.index, record.location, "contaminated",
                                    f"{hit.eval_set}:{hit.eval_id} {hit.kind} score {hit.score:.2f} overlap "
                                    f"{hit.overlap:.2f}", dataclasses.asdict(hit)))
                    continue
            rendered = render_example(record.problem, record.response, template=self.template,
                                      dialect=self.dialect, train_on_outputs=self.train_on_outputs)
            texts.append(rendered.text)
            spans.append(rendered.train_spans)
            pending.append((len(out), record, blocks))
            out.append(None)
        # One batched call: the fast tokenizer's own throughput is the bench's baseline.
        encodings = self.backend.encode_batch(texts, add_special_tokens=True) if texts else []
        for (slot, record, blocks), encoding, text, train_spans in zip(pending, encodings, texts, spans, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int32)
            if len(ids) > self.seq_length:
                out[slot] = Drop(record.source, record.index, record.location, "over_length",
                                 f"{len(ids)} tokens > seq_length {self.seq_length}")
                continue
            trained = np.zeros(len(ids), dtype=np.int8)
            for a, b in train_spans:
                first, last = _tokens_starting_in(encoding, a, b, len(text))
                trained[first:last] = 1
            out[slot] = Document(
                record.source, record.index, record.location, exact_key(record.problem, record.response),
                self.minhasher.signature(f"{record.problem}\n{record.response}") if self.minhasher else None,
                ids, trained, blocks)
        return out  # type: ignore[return-value]


def _tokens_starting_in(encoding, a: int, b: int, text_length: int) -> tuple[int, int]:
    """[first, last) token indices whose first character lies in the character span [a, b).

    Asks the Rust encoding for the few tokens at the span's edges instead of materializing every token's
    offsets in Python (which costs more than the tokenization itself). Tokens the tokenizer adds by itself
    (BOS/EOS, offsets (0, 0)) never start inside a response span.
    """
    n = len(encoding.ids)
    first = None
    for c in range(a, b):  # the first character inside the span that belongs to a token
        first = encoding.char_to_token(c)
        if first is not None:
            break
    if first is None:
        return 0, 0
    if encoding.token_to_chars(first)[0] < a:  # that token straddles the span's start: not trained
        first += 1
    if b == text_length:  # the usual case (the span runs to the end): skip trailing added special tokens
        last = n - 1
        while last >= first and (encoding.token_to_chars(last) or (-1, -1))[0] < a:
            last -= 1
        return first, last + 1
    last = None
    for c in range(b - 1, a - 1, -1):
        last = encoding.char_to_token(c)
        if last is not None:
            break
    # char_to_token gives the first token of a character split into several byte tokens: take them all.
    start = encoding.token_to_chars(last)[0]
    while last + 1 < n and (encoding.token_to_chars(last + 1) or (-1, -1))[0] == start:
        last += 1
    return first, last + 1
