"""Per-request random streams (``SamplingParams.streams``): a seeded row samples the same tokens
whichever rows share its call, its batch or its order, in plain and in lookup-speculative decoding."""

from __future__ import annotations

import pytest
import torch

from rlspec.rollout.base import SamplingParams, stream_keys
from rlspec.rollout.native import NativeEngine
from tests.rollout.test_lookup import _lookup_engine
from tests.rollout.test_spec_engine import PROMPTS, V, _model

KEYS = [2**62 + 17, 5, 123456789, 2**63 - 1, 0]  # one key per prompt of PROMPTS
PARAMS = [SamplingParams(max_new_tokens=40, temperature=1.0, seed=3),
          SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=4)]


def _by_key(result, keys):
    return {k: (ids, fr) for k, ids, fr in zip(keys, result.response_ids, result.finish_reasons)}


@pytest.mark.parametrize("params", PARAMS, ids=["T1", "top_p"])
def test_a_row_samples_the_same_alone_batched_reordered_and_at_any_batch_size(params):
    model = _model(0, bigram=False)
    wide = NativeEngine(model, eos_token_ids=[V - 1], max_batch_size=8)
    narrow = NativeEngine(model, eos_token_ids=[V - 1], max_batch_size=2)  # rows admitted as others finish

    def run(engine, idx):
        out = engine.generate([PROMPTS[i] for i in idx], SamplingParams(**{**vars(params), "streams": [KEYS[i] for i in idx]}))
        return out, _by_key(out, [KEYS[i] for i in idx])

    full, ref = run(wide, range(5))
    assert len({tuple(r) for r in full.response_ids}) >= 4 and max(map(len, full.response_ids)) > 10  # real samples
    for engine, idx in ((wide, [3]), (wide, [4, 1, 0]), (narrow, range(5)), (narrow, [2, 3]), (wide, [0])):
        out, got = run(engine, idx)
        assert got == {k: ref[k] for k in got}
        for i, lp in zip(idx, out.response_logprobs):  # same logits up to rounding
            torch.testing.assert_close(lp, full.response_logprobs[i], atol=1e-4, rtol=0)
    # the key is what decides: another key for row 0 changes its tokens, not the others'
    moved = wide.generate(PROMPTS, SamplingParams(**{**vars(params), "streams": [KEYS[0] + 1, *KEYS[1:]]}))
    assert moved.response_ids[0] != full.response_ids[0] and moved.response_ids[1:] == full.response_ids[1:]


def test_default_streams_are_the_request_index():
    model = _model(1, bigram=False)
    engine = NativeEngine(model, eos_token_ids=[V - 1])
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=9)
    keyed = engine.generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=1.0, seed=9, streams=range(5)))
    assert engine.generate(PROMPTS, params).response_ids == keyed.response_ids


def test_lookup_speculation_with_streams_gives_the_plain_tokens():
    model = _model(2, bigram=False)
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]  # groups: the group source has drafts to offer
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5, streams=[7 * i + 2**40 for i in range(12)])
    plain = NativeEngine(model, eos_token_ids=[V - 1]).generate(prompts, params)
    engine = _lookup_engine(model, ["self", "group", "history"], mode="always", lengths=(2, 4), min_samples=1)
    for _ in range(2):
        out = engine.generate(prompts, params)
        assert out.response_ids == plain.response_ids and out.finish_reasons == plain.finish_reasons
    assert out.stats["spec/sd_steps"] > 0
    # a lone row of the group, speculating from its history only: still its plain tokens
    alone = engine.generate([prompts[5]], SamplingParams(**{**vars(params), "streams": [params.streams[5]]}))
    assert alone.response_ids == [plain.response_ids[5]]


def test_wrong_streams_fail_with_the_fix_named():
    model = _model(0, bigram=False)
    engine = NativeEngine(model, eos_token_ids=[V - 1])
    with pytest.raises(ValueError, match="streams has 2 keys for 5 prompts: give one stream key per prompt"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, seed=1, streams=[1, 2]))
    with pytest.raises(ValueError, match=r"streams must be ints in \[0, 2\*\*63\)"):
        SamplingParams(streams=[-1])
    with pytest.raises(ValueError, match="keys for 1 prompts"):
        stream_keys(SamplingParams(streams=()), 1)


class _OneRankOfTwo:
    """A data-parallel strategy seen from rank ``rank`` of 2, gathering only its own part."""

    world_size = 2

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def all_gather_object(self, obj):
        return [obj]


def test_data_parallel_ranks_sample_keyed_rows_as_one_engine():
    """With streams every rank samples its slice under the call's seed: the ranks' parts are what
    one engine gives (the trainer's held-out eval under data parallelism)."""
    from rlspec.trainers.strategy import DataParallelEngine

    model = _model(0, bigram=False)
    engine = NativeEngine(model, eos_token_ids=[V - 1])
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=6, streams=KEYS)
    whole = engine.generate(PROMPTS, params)
    parts = [DataParallelEngine(engine, _OneRankOfTwo(r)).generate(PROMPTS, params).response_ids for r in (0, 1)]
    assert parts[0] + parts[1] == whole.response_ids
