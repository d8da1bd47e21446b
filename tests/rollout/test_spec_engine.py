"""Speculative decoding inside the native engine: lossless against plain decoding.

Greedy: token-for-token identical output (chain and tree drafts, mixed prompt lengths, EOS inside
an accepted draft). Sampling: the joint distribution of the first two sampled tokens matches the
target's exact distribution (chi-square). Adaptive: the long-tail switch and the revert when SD
is slower.
"""

import math
import random

import pytest
import torch

from rlspec.rollout.base import SamplingParams
from rlspec.rollout.speculative.eagle import EagleDrafter
import rlspec.rollout.fast_backend as fast_backend
import rlspec.rollout.speculative.controller as controller
from rlspec.rollout.native import NativeEngine
from rlspec.config import SpeculativeConfig

V = 12


def _model(seed: int, bigram: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked next-token distributions
        if bigram:  # layers add nothing: the next token depends on the current token only
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return model


def _oracle_drafter(model):
    """For a bigram target: fc picks embed(x_{t+1}), the layer adds nothing, so the drafter's
    feature is embed(x_{t+1}) and lm_head of it has the target's argmax (RMSNorm with unit weight
    only rescales): every greedy draft is accepted."""
    drafter = EagleDrafter.from_target(model)
    h = model.config.hidden_size
    with torch.no_grad():
        drafter.fc.weight.zero_()
        drafter.fc.weight[:, :h] = torch.eye(h)
        drafter.layer.self_attn.o_proj.weight.zero_()
        drafter.layer.mlp.down_proj.weight.zero_()
    return drafter


def _engine(model, drafter, mode="always", arm="4_1_4", **kw):
    bandit = {"policy": "fixed", "fixed_arms": [arm] * 4}
    engine = NativeEngine(model, eos_token_ids=kw.pop("eos", [V - 1]), max_batch_size=kw.pop("max_batch_size", 64),
                          speculative=SpeculativeConfig(mode=mode, bandit=bandit, sources=["eagle"], **kw))
    engine.set_drafter(drafter)
    return engine


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 1], [2, 2], [7, 3, 1, 0, 5]]


@pytest.mark.parametrize("arm", ["4_1_4", "3_2_5", "3_3_9"])
@pytest.mark.parametrize("oracle", [True, False])
def test_greedy_identical_to_plain(arm, oracle):
    model = _model(0, bigram=oracle)
    drafter = _oracle_drafter(model) if oracle else EagleDrafter.from_target(model)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    plain = NativeEngine(model, eos_token_ids=[V - 1]).generate(PROMPTS, params)
    spec = _engine(model, drafter, arm=arm).generate(PROMPTS, params)
    assert spec.response_ids == plain.response_ids
    assert spec.finish_reasons == plain.finish_reasons
    for a, b in zip(spec.response_logprobs, plain.response_logprobs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert spec.stats["spec/sd_steps"] > 0
    if oracle:  # every draft accepted: depth + 1 tokens per row and step (less at the row ends)
        assert spec.stats["spec/accept_length"] > 2.5


def test_greedy_identical_with_small_row_linear(monkeypatch):
    """Plain decode and verification through the (W @ x^T)^T path that large weights take on CPU."""
    monkeypatch.setattr(fast_backend, "SMALL_ROW_LINEAR", True)
    monkeypatch.setattr(fast_backend, "SMALL_LINEAR_MIN_WEIGHT", 0)
    test_greedy_identical_to_plain("3_2_5", oracle=False)
    test_greedy_identical_to_plain("4_1_4", oracle=True)


def test_adaptive_probe_interleaves_plain_steps_losslessly():
    """After the switch SD and plain steps alternate; the plain steps' (token, hidden) pairs reach the
    drafter (an oracle drafter keeps accepting whole drafts) and the output stays plain greedy."""
    model = _model(0, bigram=True)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    plain = NativeEngine(model, eos_token_ids=[V - 1]).generate(PROMPTS, params)
    engine = _engine(model, _oracle_drafter(model), mode="adaptive", threshold=8, warmup_checks=2, probe_steps=3)
    out = engine.generate(PROMPTS, params, return_hidden_states=True)
    assert out.response_ids == plain.response_ids
    assert out.stats["spec/sd_steps"] >= 3 and out.stats["spec/tokens_per_s_plain"] > 0
    assert out.stats["spec/accept_length"] > 3.0  # depth 4: 5 tokens per row and step but at the row ends
    ref = NativeEngine(model, eos_token_ids=[V - 1]).generate(PROMPTS, params, return_hidden_states=True)
    for a, b in zip(out.response_hidden_states, ref.response_hidden_states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def _check_switch_states(monkeypatch) -> list[int]:
    """Make every switch into SD check that the states the engine kept equal a re-run of the
    prefixes (TLT's way); returns the list of the switches' row counts."""
    from rlspec.rollout.speculative.decoder import SpeculativeDecoder

    original = SpeculativeDecoder.start
    switches: list[int] = []

    def spy(self, sequences, states=None):
        assert states is not None
        original(self, sequences, None)  # the re-run (rewrites the same cache columns)
        rerun = [h.clone() for h in self.source.pending_hidden]
        original(self, sequences, states)
        for a, b in zip(self.source.pending_hidden, rerun):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        switches.append(len(sequences))

    monkeypatch.setattr(SpeculativeDecoder, "start", spy)
    return switches


@pytest.mark.parametrize("want_hidden", [False, True])
def test_switch_builds_the_drafter_state_from_the_rollouts_own_states(monkeypatch, want_hidden):
    """At the switch the drafter gets h_0 .. h_{L-1} from the prefill and decode steps (no re-run of
    the prefixes on CPU); they equal what re-running the prefixes gives (TLT's way)."""
    checked = _check_switch_states(monkeypatch)
    model = _model(1, bigram=False)
    engine = _engine(model, EagleDrafter.from_target(model), mode="adaptive", threshold=3, warmup_checks=2, eos=[3])
    prompts = [[1, 2, 3][: 1 + i % 3] + [5] * (i % 4) for i in range(9)]  # mixed prompt lengths
    engine.generate(prompts, SamplingParams(max_new_tokens=30, temperature=1.0, seed=0),
                    return_hidden_states=want_hidden)
    assert checked and checked[0] <= 3


@pytest.mark.parametrize("want_hidden", [False, True])
def test_after_a_revert_sd_is_probed_again_in_a_smaller_bucket(monkeypatch, want_hidden):
    """The first probe (12 rows, bucket 5-20) is made to lose, the second (<= 4 rows) to win: SD
    comes back in the smaller bucket from the states kept through the call (equal to a re-run of
    the prefixes), and the output stays plain greedy."""
    verdicts = iter([0.0, 1.0])  # first comparison: SD median 0 < plain 1 -> revert

    def rigged_median(values):
        rigged_median.calls += 1
        try:
            return next(verdicts)
        except StopIteration:  # later comparisons: SD wins
            return 1.0 if rigged_median.calls % 2 else 0.0
    rigged_median.calls = 0
    monkeypatch.setattr(controller, "median", rigged_median)
    starts = _check_switch_states(monkeypatch)
    model = _model(2, bigram=False)  # greedy lengths with EOS 3: 8 .. 21 for ten rows, 60 for two
    rng = random.Random(0)
    prompts = [[rng.randrange(V - 1) for _ in range(rng.randint(1, 6))] for _ in range(12)]
    params = SamplingParams(max_new_tokens=60, temperature=0.0)
    plain = NativeEngine(model, eos_token_ids=[3]).generate(prompts, params, return_hidden_states=True)
    engine = _engine(model, EagleDrafter.from_target(model), mode="adaptive", arm="3_1_3", threshold=12,
                     warmup_checks=2, probe_steps=2, eos=[3])
    assert engine.bandit.buckets == (1, 2, 5, 21)
    out = engine.generate(prompts, params, return_hidden_states=want_hidden)
    assert out.response_ids == plain.response_ids
    assert out.stats["spec/reverted"] == 1 and out.stats["spec/reentered"] == 1
    assert len(starts) == 2 and starts[0] == 12 and starts[1] <= 4
    assert out.stats["spec/sd_steps"] > 2 + 2  # the first probe's 2, then the second probe and beyond
    if want_hidden:
        for a, b in zip(out.response_hidden_states, plain.response_hidden_states):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # next call: the bucket that lost is skipped (back-off), the smaller one still gets SD
    again = engine.generate(prompts, params, return_hidden_states=want_hidden)
    assert again.response_ids == plain.response_ids
    assert again.stats["spec/reverted"] == 0 and again.stats["spec/reentered"] == 1
    assert len(starts) == 3 and starts[2] <= 4


def test_default_arms_are_chains_on_cpu_unless_configured():
    from rlspec.rollout.speculative.bandit import DEFAULT_ARMS_CPU

    model = _model(0, bigram=True)
    engine = NativeEngine(model, eos_token_ids=[V - 1], speculative=SpeculativeConfig())
    assert engine.bandit.table.arms == DEFAULT_ARMS_CPU
    assert all(arm.topk == 1 and arm.num_verify == arm.depth for arms in DEFAULT_ARMS_CPU for arm in arms)
    assert all(len(set(arms)) == 3 for arms in DEFAULT_ARMS_CPU)  # the bandit has a real choice
    mine = NativeEngine(model, eos_token_ids=[V - 1],
                        speculative=SpeculativeConfig(bandit={"arms": [["4_2_6", "3_1_3"]] * 4}))
    assert [str(a) for a in mine.bandit.table.arms[0]] == ["4_2_6", "3_1_3"]


def test_tail_phase_is_timed_from_the_switch_point():
    model = _model(4, bigram=True)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0)
    # speculative settings but no drafter: plain decoding that marks where the switch would fire
    settings = SpeculativeConfig(mode="adaptive", threshold=1, warmup_checks=3, sources=["eagle"])
    engine = NativeEngine(model, eos_token_ids=[], speculative=settings)
    out = engine.generate([[1, 2]], params)  # one row: calm from the first decode step
    # token 1 from the prefill, tokens 2-3 from the first two decode steps; the third check switches
    assert out.stats["tail_tokens"] == 30 - 3
    assert 0 < out.stats["tail_seconds"] <= out.stats["seconds"]
    assert "spec/sd_steps" not in out.stats  # no drafter: no speculative step
    busy = engine.generate([[1, 2]] * 3, params)  # 3 rows > threshold until the end: no tail
    assert "tail_seconds" not in busy.stats
    plain = NativeEngine(model, eos_token_ids=[]).generate([[1, 2]], params)
    assert "tail_seconds" not in plain.stats
    assert plain.response_ids == out.response_ids  # marking the tail changes nothing sampled


def test_eos_inside_an_accepted_draft_ends_the_row():
    model = _model(1, bigram=True)
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    free = NativeEngine(model, eos_token_ids=[]).generate(PROMPTS, params)
    # pick as EOS a token that the greedy chains emit mid-way, so it sits inside accepted drafts
    counts = torch.bincount(torch.tensor([t for r in free.response_ids for t in r[2:]]), minlength=V)
    eos = int(counts.argmax())
    plain = NativeEngine(model, eos_token_ids=[eos]).generate(PROMPTS, params)
    spec = _engine(model, _oracle_drafter(model), arm="6_1_6", eos=[eos]).generate(PROMPTS, params)
    assert spec.response_ids == plain.response_ids
    ended = [r for r, f in zip(spec.response_ids, spec.finish_reasons) if f == "stop"]
    assert ended and all(r[-1] == eos and eos not in r[:-1] for r in ended)
    assert spec.stats["spec/accept_length"] > 2.0


def test_hidden_states_match_plain():
    model = _model(2, bigram=False)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    plain = NativeEngine(model, eos_token_ids=[V - 1]).generate(PROMPTS, params, return_hidden_states=True)
    spec = _engine(model, EagleDrafter.from_target(model), arm="3_2_5").generate(PROMPTS, params,
                                                                                return_hidden_states=True)
    assert spec.response_ids == plain.response_ids
    for a, b in zip(spec.response_hidden_states, plain.response_hidden_states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def _exact_three_token_probs(model, prompt, temperature):
    """p(x1, x2, x3 | prompt) under temperature sampling, from full forwards. ``[V**3]``."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)  # [V]
        p2 = torch.softmax(model(torch.tensor([prompt + [a] for a in range(V)])).logits[:, -1] / temperature, -1)
        seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = torch.softmax(model(seqs).logits[:, -1] / temperature, -1).view(V, V, V)
    return (p1[:, None, None] * p2[:, :, None] * p3).flatten().double()


def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, int, float]:
    keep = expected >= 5  # pool the rare cells
    obs = torch.cat([observed[keep], observed[~keep].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum())
    dof = int(keep.sum())  # cells - 1 (the pooled cell is one more)
    return stat, dof, float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


@pytest.mark.parametrize("arm", ["3_1_3", "2_3_6"])
def test_sampling_distribution_is_the_target_distribution(arm):
    """Chi-square of the first three sampled tokens (joint) against the exact target distribution
    (the first comes from the prefill, the next two from speculative steps); the same test
    rejects a biased sample, so it can fail."""
    torch.manual_seed(0)
    model = _model(3, bigram=False)
    drafter = EagleDrafter.from_target(model, seed=5)
    prompt = [3, 1, 4]
    n = 4000
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=11)
    engine = _engine(model, drafter, arm=arm, max_batch_size=n, eos=[])
    out = engine.generate([prompt] * n, params)
    assert out.stats["spec/sd_steps"] >= 1
    triples = torch.tensor([(r[0] * V + r[1]) * V + r[2] for r in out.response_ids])
    observed = torch.bincount(triples, minlength=V**3).double()
    expected = _exact_three_token_probs(model, prompt, 1.0) * n
    stat, dof, p = _chi_square_p(observed, expected)
    assert dof >= 10 and p > 1e-3, (stat, dof, p)
    # negative control: the same sample with the third token replaced by the drafter's greedy guess
    # (what a verifier that always accepts would emit) is rejected
    biased = triples - triples % V + torch.tensor([_greedy_draft(drafter, model, prompt, r) for r in out.response_ids])
    stat_bad, _, p_bad = _chi_square_p(torch.bincount(biased, minlength=V**3).double(), expected)
    assert p_bad < 1e-6, stat_bad


def _greedy_draft(drafter, model, prompt, response):
    with torch.no_grad():
        seq = torch.tensor([prompt + response[:2]])
        hidden = model(seq, output_hidden_states=True).hidden_states[-1]  # [1, T, H]
        _, logits = drafter(seq[:, 1:], hidden[:, :-1])
    return int(logits[0, -1].argmax())


def test_adaptive_switches_on_the_tail_and_reverts_when_slower():
    model = _model(4, bigram=True)
    drafter = EagleDrafter.from_target(model)  # random drafter: SD cannot pay off
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=0)
    engine = _engine(model, drafter, mode="adaptive", threshold=2, warmup_checks=3, probe_steps=4, eos=[])
    prompts = [[1, 2]] * 6
    out = engine.generate(prompts, params)
    # all rows stay alive (no EOS): 6 > threshold 2, so never calm: no SD at all
    assert out.stats["spec/sd_steps"] == 0 and out.stats["spec/frac_steps_sd"] == 0
    out = engine.generate([[1, 2]], params)  # one row: calm from the start -> switch after 3 checks
    assert out.stats["spec/sd_steps"] >= 1
    if out.stats["spec/reverted"]:  # slower than plain: back to plain, and the next call skips SD
        assert out.stats["spec/sd_steps"] == 4
        again = engine.generate([[1, 2]], params)
        assert again.stats["spec/sd_steps"] == 0
    assert math.isfinite(out.stats["spec/accept_length"])


def test_long_tail_hook_gets_the_finished_responses_with_hidden_states():
    model = _model(5, bigram=True)
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [0], [3, 3]]
    free = NativeEngine(model, eos_token_ids=[]).generate(prompts, params).response_ids
    # an EOS that ends most rows early and never appears in at least one (the tail)
    eos = next(t for t in range(V) if sum(t in r[:20] for r in free) >= 3 and any(t not in r for r in free))
    tail = sum(eos not in r for r in free)  # rows that run to the cap
    engine = _engine(model, EagleDrafter.from_target(model), mode="adaptive", threshold=tail, warmup_checks=2,
                     eos=[eos])
    seen = []
    engine.on_long_tail = seen.append
    out = engine.generate(prompts, params, return_hidden_states=True)
    assert len(seen) == 1  # once per call
    finished = seen[0]
    assert len(finished) >= 3 and all(len(h) == len(r) for _, r, h in finished)
    for prompt, response, hidden in finished:  # the same tokens and hidden states as the result
        i = prompts.index(prompt)
        assert response == out.response_ids[i] and response[-1] == eos
        torch.testing.assert_close(hidden, out.response_hidden_states[i])


def test_spot_trainer_trains_in_the_background_and_publishes_on_stop():
    from rlspec.config import OnlineDrafterConfig
    from rlspec.rollout.speculative.spot_trainer import SpotDrafterTrainer

    model = _model(6, bigram=False)
    drafter = EagleDrafter.from_target(model)
    spot = SpotDrafterTrainer(drafter, OnlineDrafterConfig(lr=1e-3, batch_size=2, window=16, max_steps=10_000))
    assert spot.stop(1) == {"drafter/steps": 0.0, "drafter/lag_steps": 1.0}  # nothing started, never trained
    spot.start()  # empty buffer: nothing to train on, no thread
    assert spot._thread is None
    engine = NativeEngine(model, eos_token_ids=[V - 1])
    result = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20, temperature=1.0, seed=0),
                             return_hidden_states=True)
    assert spot.buffer.add_rollout(1, result) > 0
    before = {k: v.clone() for k, v in drafter.fc.state_dict().items()}
    version = drafter.version
    spot.start()
    import time

    time.sleep(0.3)
    metrics = spot.stop(1)  # preempts the 10k-step run
    assert 0 < metrics["drafter/steps"] < 10_000
    assert drafter.version > version and metrics["drafter/version"] == drafter.version
    assert any(not torch.equal(before[k], v) for k, v in drafter.fc.state_dict().items())  # published
    assert spot.published_step == 1 and metrics["drafter/lag_steps"] == 0.0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_frequency_ranked_draft_vocabulary_is_lossless(temperature):
    """FR-Spec: the drafter scores only the most frequent generated tokens; greedy output stays
    identical to plain decoding and sampled chains keep the target distribution (chi-square)."""
    model = _model(3, bigram=False)
    drafter = EagleDrafter.from_target(model, seed=5)
    engine = _engine(model, drafter, arm="3_1_3", max_batch_size=4000, eos=[], draft_vocab_size=6)
    engine.token_counts[[1, 3, 4, 5, 7, 9]] = 10  # the ranking a first rollout would leave
    subset = engine.draft_vocab()
    assert subset.tolist() == [1, 3, 4, 5, 7, 9]
    prompt = [3, 1, 4]
    if temperature == 0.0:
        params = SamplingParams(max_new_tokens=20, temperature=0.0)
        plain = NativeEngine(model, eos_token_ids=[]).generate(PROMPTS, params)
        out = engine.generate(PROMPTS, params)
        assert out.response_ids == plain.response_ids and out.stats["spec/sd_steps"] > 0
        return
    engine.token_counts.zero_()
    engine.token_counts[[1, 3, 4, 5, 7, 9]] = 10
    n = 4000
    out = engine.generate([prompt] * n, SamplingParams(max_new_tokens=3, temperature=1.0, seed=11))
    triples = torch.tensor([(r[0] * V + r[1]) * V + r[2] for r in out.response_ids])
    expected = _exact_three_token_probs(model, prompt, 1.0) * n
    stat, dof, p = _chi_square_p(torch.bincount(triples, minlength=V**3).double(), expected)
    assert dof >= 10 and p > 1e-3, (stat, dof, p)
