"""Tiny BERT-like and LLaMA-like Hugging Face model folders, built locally (no hub, no network).

Random weights from a fixed seed, saved with ``save_pretrained`` (safetensors), plus a small
word-level tokenizer built with the ``tokenizers`` library. Dimensions are multiples of 32 so
that group sizes 16 and 32 divide every Linear's columns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = ("the quick brown fox jumps over lazy dog a model weight is quantized to eight or four "
         "bits and restored").split()
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")
VOCAB = 64  # >= len(SPECIALS) + len(WORDS); the rest of the ids are unused


def _tokenizer(bos: str, eos: str, extra: dict[str, str]) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate((*SPECIALS, *WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token=bos, eos_token=eos, **extra)


def _save(model: torch.nn.Module, tok: PreTrainedTokenizerFast, out: Path,
          max_shard_size: str | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    tok.save_pretrained(out)
    return out


def make_tiny_llama(out: Path, seed: int = 0, max_shard_size: str | None = None,
                    tied: bool = False) -> Path:
    """A 2-layer LLaMA (hidden 64, MLP 128, GQA 4/2 heads) in ``out``; its lm_head is untied,
    or with ``tied`` shares the input embedding (and is not stored)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tied,
                      bos_token_id=5, eos_token_id=6, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    return _save(model, _tokenizer("<s>", "</s>", {}), Path(out), max_shard_size)


def make_tiny_bert(out: Path, seed: int = 0, max_shard_size: str | None = None,
                   mlm_head: bool = False) -> Path:
    """A 2-layer BERT (hidden 64, intermediate 128, 4 heads) in ``out``: a ``BertModel``
    (loads cleanly with ``AutoModel``), or with ``mlm_head`` a ``BertForMaskedLM`` (whose
    decoder is tied to the word embeddings)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                     pad_token_id=0)
    model = (BertForMaskedLM if mlm_head else BertModel)(cfg).to(torch.float32).eval()
    tok = _tokenizer("[CLS]", "[SEP]", {"cls_token": "[CLS]", "sep_token": "[SEP]",
                                        "mask_token": "[MASK]"})
    return _save(model, tok, Path(out), max_shard_size)


def sample_inputs(tok: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    return tok(["the quick brown fox jumps over the lazy dog", "a model is quantized"],
               return_tensors="pt", padding=True)
