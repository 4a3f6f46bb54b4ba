"""A complete tiny StableDiffusion3Pipeline (text encoders and tokenizers included), built locally.

Unlike ``sdtm.models.sd3.tiny_pipeline`` (no text encoders), this pipeline takes prompt strings, so it can be
saved with ``save_pretrained`` and driven end to end by ``sdtm generate``. Every weight is random
(seeded) and every tokenizer is made from a small vocabulary written here; nothing is downloaded.

Shapes (SD3 pads the concatenated CLIP hidden states to the T5 width and appends the T5 tokens):

- two CLIP text encoders, hidden size ``CLIP_HIDDEN`` = 16 each, projection 16 each, ``CLIP_TOKENS`` = 16
  tokens; 2 x 16 = 32 <= T5 width;
- T5 encoder, d_model ``T5_WIDTH`` = 32 = the transformer's ``joint_attention_dim`` (256 tokens, the
  pipeline's default ``max_sequence_length``);
- transformer ``pooled_projection_dim`` = 16 + 16 = 32 (the two pooled CLIP projections);
- VAE from ``sdtm.tiny.tiny_vae`` (no down-sampling), patch size 2, positional table of 32 x 32 tokens:
  images up to 64 x 64 pixels, multiples of 2.
"""

from __future__ import annotations

import json
import os
import string
import tempfile

import torch

CLIP_HIDDEN = 16
CLIP_TOKENS = 16
T5_WIDTH = 32
_CHARS = list(string.ascii_lowercase + string.digits)
_CLIP_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
_T5_WORDS = ["cat", "dog", "photo", "red", "blue", "of", "a"]


def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary over lower-case letters and digits (each also as a word end,
    ``x</w>``), the two CLIP special tokens first, and a few merges."""
    tokens = ["<|startoftext|>", "<|endoftext|>"] + _CHARS + [c + "</w>" for c in _CHARS]
    tokens += ["".join(pair) for pair in _CLIP_MERGES]
    return {token: index for index, token in enumerate(tokens)}, [" ".join(pair) for pair in _CLIP_MERGES]


def tiny_clip_tokenizer(model_max_length: int = CLIP_TOKENS):
    """A ``CLIPTokenizer`` loaded from a vocab.json / merges.txt pair written to a temporary folder
    (unknown characters map to ``<|endoftext|>``, CLIP's unknown token)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 256):
    """A ``T5TokenizerFast`` around a ``tokenizers.Tokenizer`` (Unigram, lower-cased, SentencePiece-style
    ``▁`` word starts) with T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2; no sentinel tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + word, -1.0) for word in _T5_WORDS]
    pieces += [("▁" + c, -3.0) for c in _CHARS] + [(c, -3.5) for c in _CHARS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=model_max_length)


def _tiny_clip_encoder(vocab_size: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_TOKENS,
        projection_dim=CLIP_HIDDEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def _tiny_t5_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def build_tiny_full_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` with every component, random weights seeded from ``seed``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from sdtm.models.sd3 import TinySpec, tiny_transformer
    from sdtm.tiny import tiny_vae

    spec = TinySpec(joint_attention_dim=T5_WIDTH, pooled_projection_dim=2 * CLIP_HIDDEN, sample_size=64)
    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_transformer(spec, seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(spec.in_channels, seed),
        text_encoder=_tiny_clip_encoder(len(clip_tokenizer), seed + 1),
        tokenizer=clip_tokenizer,
        text_encoder_2=_tiny_clip_encoder(len(clip_tokenizer), seed + 2),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_tiny_t5_encoder(len(t5_tokenizer), seed + 3),
        tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_full_pipeline(path: str | os.PathLike, seed: int = 0) -> str:
    """Write the tiny pipeline as a diffusers folder at ``path`` (safetensors); returns the path."""
    build_tiny_full_pipeline(seed).save_pretrained(str(path))
    return str(path)
