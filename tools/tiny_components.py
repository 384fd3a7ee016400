"""Small random-weight stand-ins for the checkpoint's HF folders (wav2vec2, the umT5 tokenizer).

Test and benchmark fixtures only (`make_checkpoint.py` writes them into the tiny checkpoint); the
runtime reads the real folders with transformers / tokenizers and never imports this module.

    write_tiny_wav2vec(ckpt / "wav2vec2-large-xlsr-53-english", PRESETS["tiny"].wav2vec, seed=0)
    write_tiny_tokenizer(ckpt / "google" / "umt5-xxl", vocab_size=PRESETS["tiny"].t5.vocab)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from liveavatar_lite.conditioning.audio_features import CONV_KERNEL, CONV_STRIDE
from liveavatar_lite.conditioning.text_tokenizer import EOS_ID, SPECIALS, UNK_ID
from liveavatar_lite.config import Wav2VecConfig

# jonatasgrosman/wav2vec2-large-xlsr-53-english CTC vocabulary (33 symbols).
_CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "'", "-"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def write_tiny_wav2vec(out_dir: str | Path, cfg: Wav2VecConfig, seed: int = 0) -> Path:
    """Write a random-weight Wav2Vec2ForCTC HF folder shaped like wav2vec2-large-xlsr-53-english.

    Files: config.json, preprocessor_config.json, model.safetensors, vocab.json (+ tokenizer files).
    Same structure as the real model (layer-norm conv front-end, stable (pre-LN) transformer, real
    conv kernels and strides, so hop 320), with `cfg`'s widths.

        write_tiny_wav2vec(ckpt / "wav2vec2-large-xlsr-53-english", PRESETS["tiny"].wav2vec, seed=0)
    """
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(cfg.conv_dim) != len(CONV_KERNEL):
        raise ValueError(f"conv_dim needs {len(CONV_KERNEL)} entries, got {len(cfg.conv_dim)}")
    hf_cfg = Wav2Vec2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=list(cfg.conv_dim),
        conv_kernel=list(CONV_KERNEL),
        conv_stride=list(CONV_STRIDE),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=cfg.num_conv_pos_embedding_groups,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(hf_cfg).eval()
    model.save_pretrained(str(out), safe_serialization=True)

    vocab = {s: i for i, s in enumerate(_CTC_VOCAB[: cfg.vocab_size])}
    (out / "vocab.json").write_text(json.dumps(vocab, indent=2) + "\n")
    tokenizer = Wav2Vec2CTCTokenizer(
        str(out / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=cfg.sample_rate,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )
    # Saved separately so the folder holds preprocessor_config.json (the released layout, which
    # transformers 4.x reads) rather than transformers 5's combined processor_config.json.
    extractor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


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
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in SPECIALS]
    seen = set(SPECIALS)

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
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

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
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
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
