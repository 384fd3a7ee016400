"""Prompt tokenization as upstream does it for umT5.

Upstream (Wan `HuggingfaceTokenizer(clean="whitespace")`) fixes the text with ftfy, unescapes HTML
twice, collapses whitespace, then tokenizes with `google/umt5-xxl` (adds `</s>`), pads or truncates
to 512 tokens and returns ids plus an attention mask. The encoder output is later cut to the real
length (mask sum).

    tok = load_tokenizer(ckpt.tokenizer_dir); ids, mask = tokenize(tok, ["a person talking"])
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UserError, first_line

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5 / umT5 special token ids
SPECIALS = ("<pad>", "</s>", "<unk>")
MAX_PROMPT_CHARS = 20_000  # umT5 sees 512 tokens (~2-3k characters); far longer text is a mistake
# Control characters (C0 but tab/newline/CR, DEL, C1) are no text a person types: an escape sequence
# pasted by mistake, or one aimed at whoever later reads the prompt in a terminal or a log.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def check_prompt(prompt: str) -> str:
    """The prompt, if it is text the tokenizer can take; else UserError (one line).

    Refused: bytes that are not UTF-8 (Python hands them over as lone surrogates), NUL and other
    control characters (tab, newline and CR are whitespace), and prompts over MAX_PROMPT_CHARS characters. check_prompt("a person talking")
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"--prompt is not valid UTF-8 text (bad byte at character {e.start}); "
                        "save it as UTF-8 or pass it from a UTF-8 terminal") from None
    bad = _CONTROL.search(prompt)
    if bad is not None:
        what = "a NUL character" if bad.group() == "\0" else f"a control character (U+{ord(bad.group()):04X})"
        raise UserError(f"--prompt contains {what} at character {bad.start()}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"--prompt has {len(prompt)} characters; umT5 reads at most 512 tokens, "
                        f"so keep it under {MAX_PROMPT_CHARS}")
    return prompt


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
