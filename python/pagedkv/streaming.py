"""Cached, exact, incremental token decoding and streamers for ``generate``.

:class:`TokenDecoder` turns ids into text as they arrive, in O(1) per token: the C++ core resolves
each id to its bytes from the tokenizer's own vocabulary (byte-level BPE or SentencePiece rules, an
LRU cache of resolved pieces), holds back incomplete UTF-8 sequences, and carries SentencePiece's
first-space rule and transformers' clean-up rules through the stream. The concatenated output equals
``tokenizer.decode(ids, skip_special_tokens=...)``. Tokenizers it cannot model exactly raise
:class:`UnsupportedTokenizerError`, or (``fallback=True``) use the tokenizer's own decode.

:class:`CachedTextStreamer` / :class:`CachedTextIteratorStreamer` follow transformers'
``TextStreamer`` / ``TextIteratorStreamer`` protocol (``put`` / ``end``)::

    model.generate(ids, streamer=pagedkv.CachedTextStreamer(tokenizer, skip_prompt=True))
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from queue import Queue
from typing import Any

from pagedkv import _C

BYTE_LEVEL, SENTENCEPIECE = 0, 1
_CALIBRATION = [
    "Hello world. It's a test, isn't it?",
    "  leading spaces and trailing  ",
    "Ünïcödé café naïve — “quotes” … 日本語のテキスト 한국어 Ελληνικά",
    "emoji 😀👍🏽 flags 🇫🇷 family 👨‍👩‍👧",
    "numbers 12345 67.89\ttabs\nnew lines\n\n",
]


class UnsupportedTokenizerError(ValueError):
    """The tokenizer's decoding cannot be modelled exactly by the cached decoder."""


def _decoder_rule(tokenizer: Any) -> tuple[int, bool]:
    """(piece rule, strip first space) from the tokenizer's decoder pipeline."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is None:
        raise UnsupportedTokenizerError(f"{type(tokenizer).__name__} has no tokenizers-backend decoder to model")
    state = decoder.__getstate__()
    spec = json.loads(state.decode() if isinstance(state, bytes) else state)
    kind = spec.get("type")
    if kind == "ByteLevel":
        return BYTE_LEVEL, False
    if kind == "Metaspace" and spec.get("replacement") == "\u2581":
        return SENTENCEPIECE, spec.get("prepend_scheme", "always") != "never"
    if kind == "Sequence":
        steps = spec.get("decoders", [])
        types = [d.get("type") for d in steps]
        replace_ok = any(d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "\u2581"
                         and d.get("content") == " " for d in steps)
        strip = [d for d in steps if d.get("type") == "Strip"]
        strip_ok = all(d.get("content") == " " and d.get("start") == 1 and d.get("stop") == 0 for d in strip)
        allowed = {"Replace", "ByteFallback", "Fuse", "Strip"}
        if replace_ok and strip_ok and set(types) <= allowed and len(strip) <= 1:
            return SENTENCEPIECE, bool(strip)
    raise UnsupportedTokenizerError(f"decoder {kind!r} of {type(tokenizer).__name__} is not modelled "
                                    f"(byte-level BPE and SentencePiece are)")


def _as_rows(ids: Any, batch_size: int) -> list[list[int]]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    ids = list(ids)
    if batch_size == 1 and (not ids or not isinstance(ids[0], (list, tuple))):
        return [[int(i) for i in ids]]
    if len(ids) != batch_size:
        raise ValueError(f"ids has {len(ids)} rows but the decoder streams batch_size={batch_size} sequences")
    return [[int(i) for i in (row if isinstance(row, (list, tuple)) else [row])] for row in ids]


class _TokenizerDecodeStream:
    """Fallback for tokenizers the core does not model: the tokenizer's own decode of each whole
    sequence, emitting the new suffix (exact, but O(length) per push)."""

    def __init__(self, tokenizer: Any, batch_size: int, skip_special_tokens: bool, clean_up: bool | None):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.kw = dict(skip_special_tokens=skip_special_tokens)
        if clean_up is not None:
            self.kw["clean_up_tokenization_spaces"] = clean_up
        self.reset(batch_size)

    def reset(self, batch_size: int) -> None:
        self.ids: list[list[int]] = [[] for _ in range(batch_size)]
        self.sent = [0] * batch_size

    def push(self, rows: list[list[int]], final: bool = False) -> list[str]:
        out = []
        for s, row in enumerate(rows):
            self.ids[s].extend(row)
            text = self.tokenizer.decode(self.ids[s], **self.kw)
            end = len(text) if final else len(text.rstrip("\ufffd"))
            out.append(text[self.sent[s]:end])
            self.sent[s] = max(self.sent[s], end)
        return out


class TokenDecoder:
    """Exact incremental decoding of ``batch_size`` token streams.

    Parameters
    ----------
    tokenizer:
        A transformers tokenizer (byte-level BPE such as GPT-2/SmolLM2, or SentencePiece such as Llama).
    skip_special_tokens:
        As in ``tokenizer.decode``.
    clean_up_tokenization_spaces:
        As in ``tokenizer.decode``; None follows the tokenizer's setting.
    capacity:
        Resolved pieces kept in the LRU cache (0: no bound).
    sentence_ends:
        If given (e.g. ``".!?\\n"``), ``push`` returns whole sentences only (text through the last of
        these characters); ``flush`` returns the rest.
    fallback:
        For tokenizers the core cannot model: True uses the tokenizer's own decode (with a warning),
        False raises :class:`UnsupportedTokenizerError`.

    ``push`` releases the GIL while it decodes; a decoder holds per-stream state, so use one decoder
    per thread (or lock around it).
    """

    def __init__(self, tokenizer: Any, *, batch_size: int = 1, skip_special_tokens: bool = True,
                 clean_up_tokenization_spaces: bool | None = None, capacity: int = 0,
                 sentence_ends: str | None = None, fallback: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0 (0: unbounded), got {capacity!r}")
        if sentence_ends is not None and (not sentence_ends or any(ord(c) > 127 for c in sentence_ends)):
            raise ValueError(f"sentence_ends must be a non-empty string of ASCII characters, got {sentence_ends!r}")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.skip_special_tokens = skip_special_tokens
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.clean_up = clean
        if clean:  # some transformers versions ignore the clean-up for BPE tokenizers: follow what decode does
            probe = tokenizer("a , b .", add_special_tokens=False).input_ids
            applied = tokenizer.decode(probe, clean_up_tokenization_spaces=True)
            clean = applied != tokenizer.decode(probe, clean_up_tokenization_spaces=False)
        self._fallback: _TokenizerDecodeStream | None = None
        try:
            rule, strip = _decoder_rule(tokenizer)
            vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            if any(v is None for v in vocab):
                raise UnsupportedTokenizerError("the vocabulary has holes (ids without a token)")
            specials = sorted(set(tokenizer.all_special_ids) | {
                i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)})
            self._table = _C.TokenPieceTable(vocab, rule, specials, capacity)
            self._options = dict(skip_special=skip_special_tokens, strip_first_space=strip, cleanup=clean,
                                 sentence_ends=sentence_ends or "")
            self._decoder = _C.IncrementalDecoder(self._table, batch_size, **self._options)
            self._verify()
        except UnsupportedTokenizerError:
            if not fallback:
                raise
            warnings.warn(f"{type(tokenizer).__name__}: cached decoding is not exact for this tokenizer; "
                          f"using tokenizer.decode per push instead", stacklevel=2)
            if sentence_ends is not None:
                raise
            self._fallback = _TokenizerDecodeStream(tokenizer, batch_size, skip_special_tokens, clean)

    def _verify(self) -> None:
        """Decode calibration strings both ways; a mismatch means this tokenizer is not modelled."""
        probe = _C.IncrementalDecoder(self._table, 1, **{**self._options, "sentence_ends": ""})
        for text in _CALIBRATION:
            ids = self.tokenizer(text, add_special_tokens=True).input_ids
            want = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                         clean_up_tokenization_spaces=self.clean_up)
            got = probe.push([ids])[0] + probe.flush()[0]
            if got != want:
                raise UnsupportedTokenizerError(f"cached decoding of {text!r} gives {got!r}, the tokenizer {want!r}")

    @property
    def exact_core(self) -> bool:
        """True when the C++ core decodes (False: the tokenizer-decode fallback)."""
        return self._fallback is None

    def push(self, ids: Any) -> str | list[str]:
        """Append ``ids`` (one list per sequence; a flat list or int when ``batch_size == 1``) and
        return the new text (a str for one sequence, else one str per sequence)."""
        rows = _as_rows(ids, self.batch_size)
        out = self._fallback.push(rows) if self._fallback else self._decoder.push(rows)
        return out[0] if self.batch_size == 1 else out

    def flush(self) -> str | list[str]:
        """The held-back rest of every stream; the streams start over."""
        if self._fallback:
            out = self._fallback.push([[] for _ in range(self.batch_size)], final=True)
            self._fallback.reset(self.batch_size)
        else:
            out = self._decoder.flush()
        return out[0] if self.batch_size == 1 else out

    def decode(self, ids: Sequence[int]) -> str:
        """One-shot decode through the stream (equals ``tokenizer.decode``); for one-sequence decoders."""
        if self.batch_size != 1:
            raise ValueError("decode() is for batch_size=1 decoders; use push/flush")
        return self.push(list(ids)) + self.flush()

    def stats(self) -> dict[str, int]:
        if self._fallback:
            return {"hits": 0, "misses": 0, "size": 0, "capacity": 0}
        t = self._table
        return {"hits": t.hits, "misses": t.misses, "size": t.size, "capacity": t.capacity}


class CachedTextStreamer:
    """Drop-in for transformers' ``TextStreamer``: prints text as it is generated, O(1) per token.

    ``sentences=True`` prints whole sentences only (ends: ``sentence_ends``). Override
    :meth:`on_finalized_text` to send the text elsewhere.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, *, skip_special_tokens: bool = True,
                 sentences: bool = False, sentence_ends: str = ".!?\n", **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decoder = TokenDecoder(tokenizer, skip_special_tokens=skip_special_tokens,
                                    sentence_ends=sentence_ends if sentences else None,
                                    clean_up_tokenization_spaces=decode_kwargs.pop("clean_up_tokenization_spaces", None),
                                    fallback=not sentences)
        if decode_kwargs:
            raise TypeError(f"unsupported decode arguments: {sorted(decode_kwargs)}")
        self.next_tokens_are_prompt = True

    def put(self, value: Any) -> None:
        if hasattr(value, "dim") and value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("CachedTextStreamer streams one sequence (batch size 1); use TokenDecoder for batches")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        text = self.decoder.push(value)
        if text:
            self.on_finalized_text(text)

    def end(self) -> None:
        self.on_finalized_text(self.decoder.flush(), stream_end=True)
        self.next_tokens_are_prompt = True

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class CachedTextIteratorStreamer(CachedTextStreamer):
    """Drop-in for ``TextIteratorStreamer``: iterate over the text pieces from another thread."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> "CachedTextIteratorStreamer":
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value == self.stop_signal:
            raise StopIteration()
        return value


def stream_decode(tokenizer: Any, ids: Iterable[int], **kwargs: Any) -> Iterable[str]:
    """Yield the text of ``ids`` one token at a time (convenience over :class:`TokenDecoder`)."""
    dec = TokenDecoder(tokenizer, **kwargs)
    for i in ids:
        text = dec.push([int(i)])
        if text:
            yield text
    rest = dec.flush()
    if rest:
        yield rest
