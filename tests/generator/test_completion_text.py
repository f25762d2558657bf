"""Completion text equals the decoded completion tokens (cut at a stop string), in the engine and
in its text pieces: chains of tokens emitted exactly by a constructed model, and random tokens."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from extmind.tiny_tokenizers import build_tokenizer
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import Chunk, GenerationRequest, Sampling
from services.generator.stop_text import IncrementalDecoder, StopText, remember_single_tokens

from . import chains
from .helpers import run


@pytest.fixture(scope="module")
def chain_model(tmp_path_factory):
    return chains.build(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="module")
def engine(chain_model):
    e = GeneratorEngine(EngineConfig(model=str(chain_model[0])))
    e.start()
    yield e
    e.stop()


async def test_the_model_emits_its_chains(engine, chain_model):
    vocab = chain_model[1]
    for name, (start, out) in chains.CHAINS.items():
        tokens, _, _, final = await run(engine, GenerationRequest([vocab[start]], Sampling(max_tokens=20)))
        assert tokens == [vocab[t] for t in out[:-1]], name
        assert final.finish_reason == "stop" and final.completion_tokens == len(out), name


async def test_text_is_the_decoded_tokens_cut_at_a_stop_string(engine, chain_model):
    vocab = chain_model[1]
    cases = list(chains.cases(vocab))
    assert len(cases) > 40

    async def one(case):
        name, prompt, stops, max_tokens = case
        chunks, final = [], None
        async for ev in engine.generate(GenerationRequest(prompt, Sampling(max_tokens=max_tokens, stop=stops))):
            if isinstance(ev, Chunk):
                chunks.append(ev)
            else:
                final = ev
        ids = [t for c in chunks for t in c.token_ids]
        text = "".join(c.text for c in chunks) + final.remaining_text
        want = chains.expect(engine.tokenizer, vocab, name, stops, max_tokens)
        assert (ids, text, final.finish_reason, final.completion_tokens) == want, case
        assert not any(s in text for s in stops)
        return final.finish_reason

    alone = [await one(c) for c in cases]
    together = await asyncio.gather(*(one(c) for c in cases))  # and batched together
    assert alone == list(together)
    assert {"stop", "length", "stop_sequence"} == set(alone)


async def test_a_stop_string_completed_by_the_final_flush_is_found(engine, chain_model):
    vocab = chain_model[1]
    for name, stop, text in (("trailing_space", "moon ", " "), ("incomplete_char", "n\ufffd", " rai")):
        prompt = [vocab[chains.CHAINS[name][0]]]
        for max_tokens in (0, len(chains.CHAINS[name][1]) - 1):  # ended by EOS, then by max_tokens
            tokens, _, got, final = await run(
                engine, GenerationRequest(prompt, Sampling(max_tokens=max_tokens, stop=(stop,)))
            )
            assert (got, final.finish_reason) == (text, "stop_sequence"), (name, max_tokens)
            assert stop not in got


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    made = {}
    for kind in ("llama", "qwen3"):
        d = Path(tmp_path_factory.mktemp(f"tok-{kind}"))
        build_tokenizer(d, kind)
        made[kind] = load_tokenizer(d)
    return made


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_random_tokens_stream_to_their_decoded_text(tokenizers, kind):
    tok = tokenizers[kind]
    rng = random.Random(7)
    vocab = len(tok)
    byte_ids = [i for t, i in tok.get_vocab().items() if len(t) == 1]  # single bytes: split characters
    stops_hit = 0
    for trial in range(300):
        n = rng.randint(1, 24)
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(n)]
        full = tok.decode(ids)
        stops = ()
        if trial % 2 and full:
            a = rng.randrange(len(full))
            stops = (full[a : a + rng.randint(1, 4)], "\x00never")
        text = StopText(IncrementalDecoder(tok.decode), stops)
        pieces, hit, fed = [], False, 0
        for k, t in enumerate(ids):
            piece, hit = text.push(t, last=k == n - 1 and trial % 3 == 0)
            pieces.append(piece)
            fed += 1
            if hit:
                break
        if not hit:
            rest, hit = text.finish()
            pieces.append(rest)
        got = "".join(pieces)
        if not stops:
            assert got == full and not hit, (ids, got, full)
            continue
        # Cut before the stop string, at the first token whose text completed it.
        stops_hit += hit
        assert stops[0] not in got
        assert full.startswith(got)
        if hit:
            assert tok.decode(ids[:fed]).startswith(got + stops[0]), (ids, stops, got)
            assert stops[0] not in tok.decode(ids[: fed - 1]).rstrip("\ufffd")  # not completed earlier
        else:
            assert got == full
    assert stops_hit > 50


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_remembered_single_token_texts_stream_the_same_text(tokenizers, kind):
    """The engine's detokenizers share one decode that remembers single tokens' texts: every
    stream's text, token by token, is the one the tokenizer's own decode gives."""
    tok = tokenizers[kind]
    rng = random.Random(11)
    byte_ids = [i for t, i in tok.get_vocab().items() if len(t) == 1]
    remembered = remember_single_tokens(tok.decode)  # shared by all the streams below
    for _ in range(200):
        n = rng.randint(1, 24)
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(len(tok)) for _ in range(n)]
        plain, cached = IncrementalDecoder(tok.decode), IncrementalDecoder(remembered)
        for t in ids:
            plain.add_token(t)
            cached.add_token(t)
            assert cached.text == plain.text, ids
        plain.finalize()
        cached.finalize()
        assert cached.text == plain.text, ids


def test_a_detokenizer_that_holds_text_to_the_end_still_meets_the_stop_check(tokenizers):
    # mlx-lm's BPE detokenizer holds a lone space back until finalize: the stop string "moon "
    # only appears in the text then, and must still end the text with STOP_SEQUENCE.
    tok = tokenizers["llama"]
    vocab = tok.get_vocab()
    detok = tok.detokenizer
    text = StopText(detok, ("moon ",))
    assert text.push(vocab["Ġmoon"], last=False) == ("", False)
    assert text.push(vocab["Ġ"], last=False) == ("", False)
    assert text.finish() == ("", True)
    assert text.finish() == ("", True)  # and nothing after it


def test_the_decoder_keeps_a_leading_space_and_waits_for_whole_characters(tokenizers):
    tok = tokenizers["llama"]
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in ("Ġthe", "ð", "Ł", "ĺ", "Ģ", "Ġ")]
    d = IncrementalDecoder(tok.decode)
    seen = []
    for t in ids:
        d.add_token(t)
        seen.append(d.text)
    assert seen == [" the", " the", " the", " the", " the\U0001f600", " the\U0001f600 "]
    d.finalize()
    assert d.text == tok.decode(ids) == " the\U0001f600 "


def test_a_sentencepiece_style_decoder_streams_to_its_decoded_text():
    # SentencePiece decoders drop the first token's leading space and join byte-fallback tokens:
    # the decoder's windows must treat both as decode does on the whole completion.
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from extmind.tiny_tokenizers import _CORPUS

    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    sp.train_from_iterator(
        [line for line in _CORPUS.splitlines() if line],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))],
            show_progress=False,
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=sp)
    assert "<0xF0>" in tok.convert_ids_to_tokens(tok.encode("a 😀", add_special_tokens=False))
    words = _CORPUS.split() + ["😀", "é", "naïve", "日本", " ", "\n"]
    rng = random.Random(3)
    for _ in range(300):
        ids = tok.encode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))), add_special_tokens=False)
        ids = ids[rng.randrange(len(ids)) :]  # a completion may start anywhere, a space included
        text = StopText(IncrementalDecoder(tok.decode), ())
        got = "".join(text.push(t, last=False)[0] for t in ids) + text.finish()[0]
        assert got == tok.decode(ids), ids
