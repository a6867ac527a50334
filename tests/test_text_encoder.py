"""Prompt cleaning, tokenisation and encoding as the official T5EncoderModel does it."""
from __future__ import annotations

import pytest
import torch

from launcher.checkpoint import inspect_checkpoint
from launcher.checkpoint.load import load_text_encoder, load_tokenizer
from launcher.wan.tasks import OFFICIAL_NEGATIVE_PROMPT, TASKS
from launcher.wan.text_encoder import clean_prompt, encode_prompts, tokenize


@pytest.mark.parametrize("raw, clean", [
    ("  a  cat\n\tsits  ", "a cat sits"),
    ("fish &amp;amp; chips", "fish & chips"),      # html.unescape applied twice
    ("caf\u00c3\u00a9 au lait", "caf\u00e9 au lait"),  # ftfy repairs mojibake
    ("\u00a0x\u3000y\u2028z ", "x y z"),            # every Unicode space collapses
    ("", ""),
])
def test_clean_prompt(raw: str, clean: str) -> None:
    assert clean_prompt(raw) == clean


@pytest.fixture(scope="module")
def t5(tiny_ckpt):
    info = inspect_checkpoint(tiny_ckpt("t2v-A14B"), TASKS["t2v-A14B"])
    return load_tokenizer(info), load_text_encoder(info, dtype=torch.float32, device="cpu")


def test_tokens_end_with_eos_and_pad_to_text_len(t5) -> None:
    tokenizer, _ = t5
    ids, mask = tokenize(tokenizer, ["a cat", OFFICIAL_NEGATIVE_PROMPT], text_len=512)
    assert ids.shape == mask.shape == (2, 512)
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[n - 1] == tokenizer.eos_token_id == 1
        assert (row[n:] == tokenizer.pad_token_id).all() and tokenizer.pad_token_id == 0
        assert m[:n].all() and not m[n:].any()
    assert tokenizer.unk_token_id not in ids[1, : int(mask[1].sum())]  # Chinese is encoded, not <unk>


def test_truncation_keeps_eos(t5) -> None:
    tokenizer, _ = t5
    ids, mask = tokenize(tokenizer, ["cat " * 40], text_len=16)
    assert mask.sum() == 16 and ids[0, -1] == tokenizer.eos_token_id


def test_cleaning_happens_before_tokenising(t5) -> None:
    tokenizer, _ = t5
    assert torch.equal(tokenize(tokenizer, ["  a   cat &amp;amp;  "])[0], tokenize(tokenizer, ["a cat &"])[0])


def test_contexts_are_trimmed_to_real_tokens(t5) -> None:
    tokenizer, encoder = t5
    texts = ["a cat walking on the street", OFFICIAL_NEGATIVE_PROMPT]
    ctx = encode_prompts(tokenizer, encoder, texts, device="cpu")
    _, mask = tokenize(tokenizer, texts)
    assert [c.shape for c in ctx] == [(int(m.sum()), encoder.config.d_model) for m in mask]
    # pads are masked keys: the real rows equal an encoder run without any padding
    for text, c in zip(texts, ctx):
        ids, m = tokenize(tokenizer, [text], text_len=int(c.shape[0]))
        alone = encoder(input_ids=ids, attention_mask=m).last_hidden_state[0]
        torch.testing.assert_close(c, alone, rtol=1e-5, atol=1e-5)


def test_encoding_does_not_depend_on_the_batch(t5) -> None:
    tokenizer, encoder = t5
    both = encode_prompts(tokenizer, encoder, ["a dog", "the sea at night"], device="cpu")
    one = encode_prompts(tokenizer, encoder, ["the sea at night"], device="cpu")
    torch.testing.assert_close(both[1], one[0], rtol=1e-5, atol=1e-6)
