"""The attention-mass metric measured on one decode step in ``--attention-mass-every``
(services/generator/attention_mass.py, "Sampled steps"): the steps it measures are real decode
forwards, each matched to the numpy model's step, the histogram is their mean, a request is
measured from its first step (a short one too), and 0 measures nothing."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.generator import attention_mass
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run
from .memory_helpers import assert_decidable, ref_memory

SHARE = "extmind_generator_memory_attention_share"


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture(scope="module")
def engines(llama_path, memory_address):
    made = {}
    for every in (4, 8, 0):
        e = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=memory_address, attention_mass_every=every))
        e.start()
        made[every] = e
    yield made
    for e in made.values():
        e.stop()


@pytest.fixture
def handed(monkeypatch):
    """Every decode forward whose attention mass went to the tallies: its shares per layer
    [B, H, 1] as numpy, and the steps each ended request's mean was taken over."""
    forwards, steps = [], []
    split, means = attention_mass.forward_shares, attention_mass.MassSum.means

    def forward_shares(*a, **kw):
        out = split(*a, **kw)
        forwards.extend([np.array(x) for x in fwd] for _, fwd in out)
        return out

    monkeypatch.setattr(attention_mass, "forward_shares", forward_shares)
    monkeypatch.setattr(attention_mass.MassSum, "means", lambda self: steps.append(self.steps) or means(self))
    return forwards, steps


def match_steps(forwards: list, ref_shares: dict, heads: int) -> list[int]:
    """The numpy model's step of each handed-out forward: its shares (every layer and head) equal
    that step's within float32 rounding, and every other step's differ by far more (checked)."""
    layers = sorted(ref_shares)
    ref = np.stack([np.asarray(ref_shares[i]).reshape(-1, heads) for i in layers], axis=1)  # [steps, layers, H]
    found = []
    for fwd in forwards:
        got = np.stack([a.reshape(-1) for a in fwd])  # [layers, H] (batch of one)
        dist = np.abs(ref - got).max(axis=(1, 2))
        order = np.argsort(dist)
        assert dist[order[0]] < 1e-4 and dist[order[1]] > 1e-3, dist  # one step, and only one, matches
        found.append(int(order[0]))
    return found


async def test_sampled_steps_are_real_forwards_and_their_mean_is_observed(engines, memory, ref, handed):
    forwards, steps = handed
    engine = engines[4]
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    prompt = engine.tokenizer.encode("Alice met Bob at")
    n = 21
    count, total = sample(SHARE + "_count"), sample(SHARE + "_sum")
    got, _, _, final = await run(
        engine, GenerationRequest(prompt, Sampling(max_tokens=n), MemoryOptions((mid,), top_k=3))
    )
    assert final.completion_tokens == n
    # One step more than generated: the forward run ahead on the last token may be handed out
    # too (no request takes it: the request ended).
    shares, margins = {}, []
    want, _ = ref.greedy(prompt, n + 1, memory=bank, top_k=3, margins=margins, shares=shares)
    assert_decidable(margins[:n])
    assert got == want[:n]
    matched = match_steps(forwards, shares, engine.num_heads)
    counted = sorted(t for t in matched if t < n)
    assert len(set(matched)) == len(matched)  # no forward handed out twice
    assert counted[0] == 0  # measured from its first forward (the last prompt token's)
    # One step in four: about n / 4 forwards, far fewer than n (a step may hold two forwards).
    assert n // 4 - 1 <= len(counted) <= n // 4 + 2 < n
    assert steps == [len(counted)]
    per_layer = [np.mean(np.asarray(shares[i]).reshape(-1, engine.num_heads)[counted]) for i in sorted(shares)]
    assert sample(SHARE + "_count") - count == 1
    assert sample(SHARE + "_sum") - total == pytest.approx(np.mean(per_layer), abs=1e-4)


async def test_a_request_shorter_than_the_interval_is_measured(engines, memory, handed):
    forwards, steps = handed
    engine = engines[8]
    mid, _ = memory
    count = sample(SHARE + "_count")
    prompt = engine.tokenizer.encode("Water boils at")
    await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions((mid,), top_k=2)))
    assert sample(SHARE + "_count") - count == 1
    assert steps == [1]  # the first step's forward


async def test_zero_measures_nothing(engines, memory, handed):
    forwards, steps = handed
    engine = engines[0]
    mid, _ = memory
    count = sample(SHARE + "_count")
    prompt = engine.tokenizer.encode("Alice met Bob at")
    _, _, _, final = await run(
        engine,
        GenerationRequest(prompt, Sampling(max_tokens=12), MemoryOptions((mid,), top_k=3, return_citations=True)),
    )
    assert final.completion_tokens == 12 and final.citations  # retrieval and citations as ever
    assert forwards == [] and steps == []
    assert sample(SHARE + "_count") == count


def test_the_flag_takes_whole_numbers_from_zero():
    from services.generator.app import parse_args

    assert parse_args(["--model", "m"]).attention_mass_every == 8
    assert parse_args(["--model", "m", "--attention-mass-every", "0"]).attention_mass_every == 0
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--attention-mass-every", "-1"])
