"""Cached incremental token decoding: exact against tokenizer.decode, in any push sizes."""

from __future__ import annotations

import random
import threading

import pytest
import torch

import pagedkv
from pagedkv import data

HARD = [
    "Ünïcödé café naïve — “quotes” … ½ ° © ™",
    "日本語のテキストと中文字符 한국어 Ελληνικά русский עברית العربية",
    "emoji 😀👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧 zwj 🏳️‍🌈 keycap 1️⃣",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "isn't it ? yes , it 's . n't ' x",
    "",
]


@pytest.fixture(scope="module", params=["stories260k", "smollm2"])
def tokenizer(request):
    from transformers import AutoTokenizer

    if request.param == "stories260k":
        path = data.stories260k()
        if not path.exists():
            pytest.skip(f"stories260K not found at {path}")
    else:
        try:
            path = data.smollm2()
        except FileNotFoundError as e:
            pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(path)


def _wikitext_lines() -> list[str]:
    return data.text_file("wikitext2").read_text(encoding="utf-8").splitlines()


def _stream(dec: pagedkv.TokenDecoder, ids: list[int], rng: random.Random | None) -> str:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 7) if rng else 1
        out.append(dec.push(ids[i:i + n]))
        i += n
    out.append(dec.flush())
    return "".join(out)


@pytest.mark.parametrize("skip", [True, False])
def test_all_wikitext_lines_exact(tokenizer, skip):
    """Every WikiText-2 test line, token by token and in random pushes, equals tokenizer.decode."""
    dec = pagedkv.TokenDecoder(tokenizer, skip_special_tokens=skip)
    assert dec.exact_core
    rng = random.Random(0)
    lines = _wikitext_lines() + HARD
    bad = []
    for k, line in enumerate(lines):
        ids = tokenizer(line, add_special_tokens=True).input_ids
        want = tokenizer.decode(ids, skip_special_tokens=skip)
        got = _stream(dec, ids, rng if k % 2 else None)
        if got != want:
            bad.append((line[:60], got[:60], want[:60]))
    assert not bad, bad[:3]
    assert dec.stats()["hits"] > 0


@pytest.mark.parametrize("clean_up", [True, False])
def test_clean_up_rules_and_concatenated_lines(tokenizer, clean_up):
    dec = pagedkv.TokenDecoder(tokenizer, clean_up_tokenization_spaces=clean_up)
    text = " ".join(_wikitext_lines()[:400]) + " " + " ".join(HARD)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    want = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up)
    assert _stream(dec, ids, random.Random(1)) == want


def test_batch_push_and_bounded_cache(tokenizer):
    lines = [line for line in _wikitext_lines() if len(line) > 200][:4]
    ids = [tokenizer(line).input_ids for line in lines]
    dec = pagedkv.TokenDecoder(tokenizer, batch_size=4, capacity=64)
    out = ["", "", "", ""]
    for t in range(max(map(len, ids))):
        new = dec.push([row[t:t + 1] for row in ids])
        out = [a + b for a, b in zip(out, new)]
    out = [a + b for a, b in zip(out, dec.flush())]
    assert out == [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    stats = dec.stats()
    assert stats["size"] <= 64 and stats["misses"] > 64  # evictions happened, results unchanged


def test_sentence_mode(tokenizer):
    text = "First sentence. Second one! A question? A line\nand the rest without end"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    dec = pagedkv.TokenDecoder(tokenizer, sentence_ends=".!?\n")
    chunks = [c for c in (dec.push([i]) for i in ids) if c]
    rest = dec.flush()
    assert "".join(chunks) + rest == tokenizer.decode(ids)
    assert all(c[-1] in ".!?\n" for c in chunks) and len(chunks) == 4


def test_errors(tokenizer):
    dec = pagedkv.TokenDecoder(tokenizer)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.push([len(tokenizer) + 5])
    assert dec.push([tokenizer("ok").input_ids[-1]]) is not None  # the stream still works
    with pytest.raises(ValueError, match="batch_size"):
        pagedkv.TokenDecoder(tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="rows"):
        pagedkv.TokenDecoder(tokenizer, batch_size=2).push([[1]])
    with pytest.raises(ValueError, match="sentence_ends"):
        pagedkv.TokenDecoder(tokenizer, sentence_ends="")


def test_unsupported_tokenizer_raises_or_falls_back():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "##s": 2, "world": 3}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    with pytest.raises(pagedkv.UnsupportedTokenizerError, match="WordPiece"):
        pagedkv.TokenDecoder(tok)
    with pytest.warns(UserWarning, match="not exact"):
        dec = pagedkv.TokenDecoder(tok, fallback=True)
    assert not dec.exact_core
    ids = tok("hellos world").input_ids
    assert dec.push(ids[:1]) + dec.push(ids[1:]) + dec.flush() == tok.decode(ids)


def test_streamers_with_generate(stories):
    model, tok = stories
    ids = tok(["Once upon a time"], return_tensors="pt").input_ids
    got = []

    class Collect(pagedkv.CachedTextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            got.append(text)

    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0,
                             streamer=Collect(tok, skip_prompt=True))
    assert "".join(got) == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    streamer = pagedkv.CachedTextIteratorStreamer(tok, skip_prompt=False, timeout=60)
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, streamer=streamer)
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("out", model.generate(ids, **kw)))
    th.start()
    text = "".join(streamer)
    th.join()
    assert text == tok.decode(result["out"][0], skip_special_tokens=True)


def test_streamed_clean_up_equals_transformers_rule():
    """The core's streamed clean-up against transformers' own clean_up_tokenization, on random text
    cut into random pushes."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    def rule(text: str) -> str:
        return PreTrainedTokenizerBase.clean_up_tokenization(None, text)

    vocab = list(" .,?!'nmsvtre") + ["é", "😀", "  "]
    table = pagedkv._C.TokenPieceTable(vocab, 1, [], 0)  # SentencePiece rule: plain characters
    dec = pagedkv._C.IncrementalDecoder(table, 1, cleanup=True)
    rng = random.Random(3)
    for _ in range(3000):
        ids = [rng.randrange(len(vocab)) for _ in range(rng.randint(0, 25))]
        text = "".join(vocab[i] for i in ids)
        got, i = "", 0
        while i < len(ids):
            n = rng.randint(1, 4)
            got += dec.push([ids[i:i + n]])[0]
            i += n
        got += dec.flush()[0]
        assert got == rule(text), text


@pytest.mark.parametrize("bad", ["gpt2", 42, None])
def test_wrong_tokenizer_type(bad):
    with pytest.raises(pagedkv.UnsupportedTokenizerError, match=type(bad).__name__):
        pagedkv.TokenDecoder(bad)
