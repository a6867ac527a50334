"""Prompt -> umt5 context exactly as the official `T5EncoderModel.__call__` (docs/pipeline_facts.md #1-#4).

The encoder sees all `text_len` positions with the pad mask; the result is trimmed to the real
length (tokens incl. `</s>`). Padding back to `text_len` rows is the DiT's job (fact 6), not ours.
"""
from __future__ import annotations

import html
import re

import ftfy
import torch
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel


def clean_prompt(text: str) -> str:
    """Official `_clean(text)` with clean='whitespace': ftfy, double html unescape, whitespace collapse."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], *, text_len: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cleaned texts -> (input_ids, attention_mask), both [B, text_len]; `</s>` kept even when truncated."""
    batch = tokenizer(
        [clean_prompt(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    encoder: UMT5EncoderModel,
    texts: list[str],
    *,
    text_len: int = 512,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One context [L_i, dim] per text, in the encoder's dtype; L_i = real tokens incl. `</s>`."""
    ids, mask = tokenize(tokenizer, texts, text_len=text_len)
    ids, mask = ids.to(device), mask.to(device)
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    lengths = mask.gt(0).sum(dim=1).tolist()
    return [h[:n] for h, n in zip(hidden, lengths)]
