"""Prompt tokenization as upstream does it for umT5, plus a tiny tokenizer folder for fixtures.

Upstream (Wan `HuggingfaceTokenizer(clean="whitespace")`) fixes the text with ftfy, unescapes HTML
twice, collapses whitespace, then tokenizes with `google/umt5-xxl` (adds `</s>`), pads or truncates
to 512 tokens and returns ids plus an attention mask. The encoder output is later cut to the real
length (mask sum).

    tok = load_tokenizer(ckpt.tokenizer_dir); ids, mask = tokenize(tok, ["a person talking"])
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5 / umT5 special token ids
_SPECIALS = ("<pad>", "</s>", "<unk>")


def clean_prompt(text: str) -> str:
    """ftfy repair, double HTML unescape, whitespace collapsed to single spaces, stripped."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(path: str | Path) -> Any:
    """Load an HF tokenizer folder (e.g. `<ckpt>/google/umt5-xxl`) with AutoTokenizer.

        tok = load_tokenizer(ckpt_dir / "google" / "umt5-xxl")
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer folder {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON errors)
        msg = first_line(e)
        raise CheckpointError(f"cannot load tokenizer from {path}: {msg}") from None


def tokenize(tokenizer: Any, prompts: str | list[str],
             text_len: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean, tokenize with special tokens, pad/truncate to `text_len`: ids, mask both [B, text_len] int64.

    The real length of prompt i is `mask[i].sum()`; the encoder output is cut to it.

        ids, mask = tokenize(tok, "a man talks", text_len=512)
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    cleaned = [clean_prompt(p) for p in prompts]
    enc = tokenizer(
        cleaned,
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


def _tiny_pieces(vocab_size: int) -> list[tuple[str, float]]:
    """Deterministic Unigram vocabulary of exactly vocab_size pieces: specials, common words, characters."""
    words = (
        "the a an and of to in is it on with for as at by this that person man woman talking talks "
        "speaking speaks singing sings face head looks camera smiling smile hair eyes mouth light "
        "background room video portrait close up young old he she his her they wearing shirt dress "
        "red blue green black white dark bright warm soft natural front view realistic high quality "
        "slowly gently moves nods hands gestures while standing sitting lit studio indoor outdoor"
    ).split()
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()/&%"
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in _SPECIALS]
    seen = set(_SPECIALS)

    def add(p: str, score: float) -> None:
        if p not in seen and len(pieces) < vocab_size:
            seen.add(p)
            pieces.append((p, score))

    add("\u2581", -2.0)  # the word-boundary marker alone
    for w in words:  # whole words first: the Viterbi segmentation prefers them
        add("\u2581" + w, -3.0)
    for c in chars:
        add(c, -6.0)
        add("\u2581" + c, -6.5)
    for a in "etaoinshrdlu":  # frequent letter pairs to fill the remaining slots
        for b in "etaoinshrdlu":
            add(a + b, -5.0)
    n = 0
    while len(pieces) < vocab_size:  # pad with unused but valid pieces so ids cover the vocab
        add(f"<unused_{n}>", -20.0)
        n += 1
    return pieces  # a small vocab_size simply stops early; uncovered characters become <unk>


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """Write a small T5-style tokenizer folder (tokenizer.json + configs) that AutoTokenizer loads.

    SentencePiece-like Unigram model with Metaspace pre-tokenization, `</s>` appended, and ids
    pad=0, eos=1, unk=2 as in umT5; every id is < vocab_size so it indexes the tiny T5 embedding.

        write_tiny_tokenizer(ckpt / "google" / "umt5-xxl", vocab_size=PRESETS["tiny"].t5.vocab)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if vocab_size < 64:
        raise ValueError(f"vocab_size {vocab_size} is too small for a tiny tokenizer (need >= 64)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram(_tiny_pieces(vocab_size), unk_id=UNK_ID, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()  # whitespace is already collapsed by clean_prompt
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 512,
        "extra_ids": 0,
        "additional_special_tokens": [],
        "padding_side": "right",
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
