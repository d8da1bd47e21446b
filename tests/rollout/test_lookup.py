"""Model-free drafts (self / group / history lookups): the index, the history store, the step
selector, and losslessness inside the native engine (greedy identical, log-probs and hidden
states equal to plain decoding, chi-square of sampled tokens with a negative control)."""

import random

import pytest
import torch

from rlspec.config import LookupConfig, SpeculativeConfig
from rlspec.errors import ConfigError
from rlspec.rollout.base import SamplingParams
from rlspec.rollout.native import NativeEngine
from rlspec.rollout.speculative.history import DraftHistory
from rlspec.rollout.speculative.draft_tree import ArmShape
from rlspec.rollout.speculative.lookup import NgramIndex, vote_draft
from rlspec.rollout.speculative.lookup_source import LookupDraftSource
from rlspec.rollout.speculative.selector import PLAIN, PlainStepCost, StepSelector

from tests.rollout.test_spec_engine import PROMPTS, V, _chi_square_p, _exact_three_token_probs, _model


# ----------------------------------------------------------------------------- the index
def test_incremental_index_equals_one_built_at_once():
    rng = random.Random(0)
    tokens = [rng.randrange(5) for _ in range(200)]
    whole = NgramIndex(2, 4)
    whole.add_document(list(tokens), "row")  # numpy hashes
    grown = NgramIndex(2, 4)
    doc = grown.add_document([], "row")
    for t in tokens:  # one token at a time (Python hashes), catching up now and then
        grown.documents[doc].tokens.append(t)
        if rng.random() < 0.3:
            grown.catch_up(doc)
    grown.catch_up(doc)
    assert grown.documents[0].tables == whole.documents[0].tables
    many = NgramIndex(2, 4)  # several documents hashed in one pass, some short, some long
    docs = [many.add_document(tokens[:k], "row") for k in (3, 10, 0)]
    for d, k in zip(docs, (100, 30, 200)):
        many.documents[d].tokens.extend(tokens[len(many.documents[d].tokens):k])
    many.catch_up_many(docs)
    for d, k in zip(docs, (100, 30, 200)):
        alone = NgramIndex(2, 4)
        alone.add_document(tokens[:k], "row")
        assert many.documents[d].tables == alone.documents[0].tables and many.documents[d].indexed == k


def test_lookup_prefers_the_longest_match_and_never_the_suffix_itself():
    idx = NgramIndex(1, 3)
    a = idx.add_document([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], "row")
    occ, n = idx.lookup([1, 2, 3], [a])
    assert n == 3 and occ == [(0, 3)]  # "1 2 3" -> 9 (the suffix at the end has no continuation)
    assert vote_draft(idx, occ, 2) == ([9, 2], 0)
    occ, n = idx.lookup([5, 2, 3], [a])  # "5 2 3" unseen: "2 3" -> its latest continuation, 7
    assert n == 2 and occ == [(0, 6)]
    assert idx.lookup([8], [a]) == ([], 0)
    b = idx.add_document([8, 4], "row")
    assert idx.lookup([8], [a]) == ([], 0) and idx.lookup([8], [a, b]) == ([(1, 1)], 1)  # only the searched


def test_vote_follows_the_majority_and_ties_go_to_the_last_listed():
    idx = NgramIndex(1, 1)
    docs = [idx.add_document(d, "row") for d in ([4, 1, 2], [4, 1, 2], [4, 1, 3], [4, 5])]
    occ, _ = idx.lookup([4], docs)
    assert vote_draft(idx, occ, 5)[0] == [1, 2]  # three say 1, then two of them say 2
    idx2 = NgramIndex(1, 1)
    docs2 = [idx2.add_document(d, "row") for d in ([4, 1], [4, 2])]
    assert vote_draft(idx2, idx2.lookup([4], docs2)[0], 5)[0] == [2]


# ----------------------------------------------------------------------------- the history
def test_history_stays_within_its_byte_bound_and_evicts_least_recently_used():
    h = DraftHistory(max_bytes=400, per_prompt=2, context=0)
    for step in range(50):
        for p in range(10):
            h.add([p], [step] * 5)  # 20 bytes each
        assert h.nbytes <= 400
    assert h.nbytes == sum(4 * len(d) for p in range(10) for d in h._by_prompt.get((p,), []))
    h.responses([0])  # prompt 0 becomes the most recently used
    h.add([99], [1] * 5)
    assert h.responses([0]) and [list(d) for d in h.responses([0])] == [[48] * 5, [49] * 5]


def test_history_state_roundtrip_and_checkpoint_budget():
    h = DraftHistory(max_bytes=10_000, per_prompt=3, context=1)
    for p in range(5):
        for k in range(4):
            h.add([100, p], [p, k])
    full = DraftHistory(max_bytes=10_000, per_prompt=3, context=1)
    full.load_state_dict(h.state_dict())
    assert full.nbytes == h.nbytes and all(
        [list(a) for a in full.responses([100, p])] == [list(b) for b in h.responses([100, p])] for p in range(5))
    small = DraftHistory(max_bytes=10_000, per_prompt=3, context=1)
    small.load_state_dict(h.state_dict(max_bytes=2 * 36))  # two prompts of 3 x 3 tokens
    assert small.prompts_newest_first() == [(100, 4), (100, 3)]  # the most recently used kept
    with pytest.raises(ValueError):
        DraftHistory(100).load_state_dict({"prompts": []})


def test_a_row_whose_drafts_are_rejected_whole_backs_off_and_comes_back():
    """After m >= 2 whole rejections in a row a row skips 2**(m-1) - 1 lookups; an accepted
    token resets it. The other row keeps drafting throughout."""
    prompts = [[1, 2, 3], [1, 2, 3]]
    responses = [[4, 5, 6, 4, 5], [4, 5, 6, 4, 5]]  # "4 5" occurred before: both rows draft "6 ..."
    src = LookupDraftSource(prompts, responses, lambda: [0, 1], ["self"], LookupConfig(), None, torch.device("cpu"))
    params = SamplingParams(max_new_tokens=8)

    def step(gained_row0: int) -> list[bool]:
        d = src.propose(ArmShape(2, 1, 2), torch.tensor([8, 8]), params, None)
        drafted = d.valid.any(dim=1).tolist() if d is not None else [False, False]
        src.accept([[7] * gained_row0, [6, 4]], [], [8, 8])  # row 1 always keeps one drafted token
        return drafted

    assert step(1) == [True, True]  # first whole rejection of row 0: no backoff yet
    assert step(1) == [True, True]  # second: skip 2**1 - 1 = 1 lookup
    assert step(1) == [False, True]
    assert step(1) == [True, True]  # third in a row: skip 3
    assert [step(1) for _ in range(3)] == [[False, True]] * 3
    assert step(2) == [True, True]  # drafted again and one token kept: the count resets
    assert step(1) == [True, True] and step(1) == [True, True] and step(1) == [False, True]


# ----------------------------------------------------------------------------- the selector
def test_selector_exploits_the_fastest_arm_and_explores_slower_arms_by_their_cost():
    s = StepSelector([PLAIN, "lookup/2", "lookup/4"], explore_every=10, min_samples=2, window=8, explore_cost=0.01)
    speed = {PLAIN: 100.0, "lookup/2": 130.0, "lookup/4": 13.0}
    picks = []
    for _ in range(606):
        arm = s.select(16)
        picks.append(arm)
        s.update(16, arm, speed[arm])
    assert picks[:6].count(PLAIN) == 2 and picks[:6].count("lookup/4") == 2  # each arm tried first
    tail = picks[6:]
    # plain (1.3x slower) waits (1.3 - 1) / 0.01 = 30 steps, lookup/4 (10x slower) 900 steps
    assert tail.count(PLAIN) in (19, 20) and tail.count("lookup/4") == 0
    assert tail.count("lookup/2") == 600 - tail.count(PLAIN)
    cost = sum(1 / speed[a] for a in tail) / (len(tail) / speed["lookup/2"]) - 1  # time lost to exploring
    assert cost < 0.02


def test_selector_measures_a_longer_draft_only_where_the_shorter_one_came_close():
    follows = {"lookup/4": "lookup/2", "lookup/8": "lookup/4"}
    s = StepSelector([PLAIN, "lookup/2", "lookup/4", "lookup/8"], min_samples=2, explore_every=10, follows=follows)
    picks = []
    for _ in range(100):  # at 64 rows drafts lose by far: longer ones are never tried
        arm = s.select(64)
        picks.append(arm)
        s.update(64, arm, {PLAIN: 100.0, "lookup/2": 40.0}.get(arm, 10.0))
    assert picks.count("lookup/4") == picks.count("lookup/8") == 0 and picks.count("lookup/2") == 2
    for _ in range(20):  # at 1 row the short draft nearly ties: the longer ones are measured
        arm = s.select(1)
        s.update(1, arm, {PLAIN: 100.0, "lookup/2": 95.0, "lookup/4": 150.0}.get(arm, 60.0))
    assert s.best(1) == "lookup/4" and len(s._bucket(1).rewards["lookup/8"]) == 2


def test_selector_prefers_plain_within_the_margin_and_follows_drift():
    s = StepSelector([PLAIN, "lookup/4"], explore_every=5, min_samples=1, window=3, margin=0.05)
    s.update(1, PLAIN, 100.0)
    s.update(1, "lookup/4", 103.0)  # within 5 %: noise, not a win
    assert s.best(1) == PLAIN
    for _ in range(3):
        s.update(1, "lookup/4", 60.0)  # and lookups get slower (the policy lost its redundancy)
    s.update(1, "lookup/4", 200.0)
    for _ in range(3):
        s.update(1, "lookup/4", 200.0)  # ... then faster again
    assert s.best(1) == "lookup/4" and s.best(64) is None  # another bucket has no data yet


# ----------------------------------------------------------------------------- the engine
def _lookup_engine(model, sources, mode="always", lengths=(3,), eos=(V - 1,), max_batch_size=64, **kw):
    settings = SpeculativeConfig(mode=mode, sources=list(sources),
                                 lookup=LookupConfig(min_ngram=1, max_ngram=3, lengths=list(lengths), **kw))
    return NativeEngine(model, eos_token_ids=list(eos), max_batch_size=max_batch_size, speculative=settings)


GROUP_PROMPTS = [p for p in PROMPTS[:3] for _ in range(4)]  # groups of 4 responses per prompt


@pytest.mark.parametrize("sources", [["self"], ["group"], ["history"], ["self", "group", "history"]])
def test_greedy_identical_to_plain_with_every_source(sources):
    model = _model(0, bigram=False)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    plain = NativeEngine(model, eos_token_ids=[V - 1]).generate(GROUP_PROMPTS, params, return_hidden_states=True)
    engine = _lookup_engine(model, sources)
    for _ in range(2):  # the second call has a history
        out = engine.generate(GROUP_PROMPTS, params, return_hidden_states=True)
        assert out.response_ids == plain.response_ids
        assert out.finish_reasons == plain.finish_reasons
        for a, b in zip(out.response_logprobs, plain.response_logprobs):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        for a, b in zip(out.response_hidden_states, plain.response_hidden_states):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    source = sources[0] if len(sources) == 1 else "self"
    assert out.stats[f"spec/{source}/drafted"] > 0 and out.stats[f"spec/{source}/accepted"] > 0


def test_adaptive_engine_mixes_plain_and_lookup_steps_losslessly():
    model = _model(1, bigram=False)
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    plain = NativeEngine(model, eos_token_ids=[V - 1]).generate(GROUP_PROMPTS, params)
    engine = _lookup_engine(model, ["self", "group", "history"], mode="adaptive", lengths=(2, 4), min_samples=1)
    sd_steps = plain_steps = 0
    for _ in range(3):
        out = engine.generate(GROUP_PROMPTS, params)
        assert out.response_ids == plain.response_ids
        sd_steps += out.stats["spec/sd_steps"]
        plain_steps += out.stats["decode_steps"] - out.stats["spec/sd_steps"]
    assert sd_steps > 0 and plain_steps > 0
    assert out.stats["spec/history_prompts"] == 3 and out.stats["spec/history_bytes"] > 0


@pytest.mark.parametrize("mode", ["always", "adaptive"])
def test_seeded_sampling_gives_the_plain_tokens_with_speculation_on(mode):
    """With a seed, token j of request r draws with the number of (seed, r, j): the lookup engine
    (drafts verified coupled with plain sampling) emits exactly what plain decoding emits, at
    T=1 and with top-p/top-k, and so does plain decoding with another batch size."""
    model = _model(2, bigram=False)
    for params in (SamplingParams(max_new_tokens=40, temperature=1.0, seed=5),
                   SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, top_k=6, seed=6)):
        plain = NativeEngine(model, eos_token_ids=[V - 1]).generate(GROUP_PROMPTS, params)
        narrow = NativeEngine(model, eos_token_ids=[V - 1], max_batch_size=3).generate(GROUP_PROMPTS, params)
        assert narrow.response_ids == plain.response_ids
        engine = _lookup_engine(model, ["self", "group", "history"], mode=mode, lengths=(2, 4), min_samples=1)
        sd_steps = accepted = 0
        for _ in range(3):  # later calls draft from their history too
            out = engine.generate(GROUP_PROMPTS, params)
            assert out.response_ids == plain.response_ids and out.finish_reasons == plain.finish_reasons
            for a, b in zip(out.response_logprobs, plain.response_logprobs):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            sd_steps += out.stats["spec/sd_steps"]
            accepted += sum(v for k, v in out.stats.items() if k.startswith("spec/") and k.endswith("/accepted"))
        assert sd_steps > 0 and accepted > 0
    other = NativeEngine(model, eos_token_ids=[V - 1]).generate(GROUP_PROMPTS, SamplingParams(
        max_new_tokens=40, temperature=1.0, seed=8))
    assert other.response_ids != plain.response_ids  # the seed matters


@pytest.mark.parametrize("sources", [["self"], ["group"], ["history"]])
def test_sampling_distribution_is_the_target_distribution(sources):
    """Chi-square of the first three sampled tokens against the exact target distribution, with
    every step after the first a lookup step; a verifier that accepted every lookup draft fails."""
    model = _model(3, bigram=False)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    n = 3000
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=11)
    engine = _lookup_engine(model, sources, eos=(), max_batch_size=n, history_per_prompt=64)
    if sources == ["history"]:  # an earlier call's responses to the same prompt
        engine.generate([prompt] * 64, SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))
    out = engine.generate([prompt] * n, params)
    assert out.stats["spec/sd_steps"] == 2 and out.stats[f"spec/{sources[0]}/drafted"] >= n
    triples = torch.tensor([(r[0] * V + r[1]) * V + r[2] for r in out.response_ids])
    observed = torch.bincount(triples, minlength=V**3).double()
    expected = _exact_three_token_probs(model, prompt, 1.0) * n
    stat, dof, p = _chi_square_p(observed, expected)
    assert dof >= 10 and p > 1e-3, (stat, dof, p)
    # negative control: the third token replaced by the self lookup's draft after the first two
    # (what a verifier that accepts every draft would emit) is rejected by the same test
    def drafted(r):
        idx = NgramIndex(1, 3)
        doc = idx.add_document(prompt + r[:2], "row")
        occ, _ = idx.lookup(prompt + r[:2], [doc])
        return vote_draft(idx, occ, 1)[0][0] if occ else r[2]
    biased = triples - triples % V + torch.tensor([drafted(r) for r in out.response_ids])
    stat_bad, _, p_bad = _chi_square_p(torch.bincount(biased, minlength=V**3).double(), expected)
    assert p_bad < 1e-6, stat_bad


def test_unknown_source_names_the_valid_ones():
    with pytest.raises(ConfigError, match="did you mean 'history'"):
        SpeculativeConfig(sources=["histroy"])
    with pytest.raises(ConfigError, match="min_ngram"):
        LookupConfig(min_ngram=5, max_ngram=3)


def test_a_step_is_scored_against_a_plain_step_at_the_same_batch_size_and_context():
    """Raw tokens/s would favour the draft here (15.6k vs 12.8k tokens/s), but it ran at 70 rows
    over short contexts, where a plain step takes 4 ms: against that it is slower."""
    s = StepSelector([PLAIN, "lookup/4"], min_samples=1)
    for _ in range(8):  # plain steps: 1 ms + 20 us per row + 0.1 us per row and column
        for rows, kv in ((128, 400), (70, 400), (128, 100), (40, 100)):
            s.record(rows, PLAIN, rows, 0.001 + 2e-5 * rows + 1e-7 * rows * kv, kv)
    plain_70 = 0.001 + 2e-5 * 70 + 1e-7 * 70 * 100
    s.record(70, "lookup/4", 140, 0.009, 100)
    assert s._bucket(100).rewards["lookup/4"][0] == pytest.approx(140 * plain_70 / (70 * 0.009), rel=1e-3)
    assert s.best(100) == PLAIN
    for _ in range(2):
        s.record(70, "lookup/4", 300, 0.009, 100)
    assert s.best(100) == "lookup/4"  # over twice the tokens per row: a real win



def test_without_waiting_prompts_a_draft_is_scored_by_its_least_advanced_row_where_steps_cost_the_same():
    """SmolLM2-135M on 2 CPU cores: a plain step costs ~95 ms at 1-4 rows, a 2-token verify ~170 ms.
    A draft step giving 2 tokens per row on average but 1 to the least-advanced row saves no step
    of the call (it lasts as long as that row): worse than plain. Where the plain cost is all per
    row (compute-bound), the least-advanced row does not matter."""
    flat = StepSelector([PLAIN, "lookup/2"], min_samples=1)
    for _ in range(8):
        for rows in (1, 2, 3, 4):
            flat.record(rows, PLAIN, rows, 0.095, kv=150)
    assert flat.plain_cost.fixed() == pytest.approx(0.095, rel=0.02)
    flat.record(4, "lookup/2", 8, 0.17, kv=150)  # no critical_tokens: a prompt waits (old reward)
    assert flat._bucket(4).rewards["lookup/2"][-1] == pytest.approx(8 * 0.095 / (4 * 0.17), rel=0.02)  # 1.12
    flat.record(4, "lookup/2", 8, 0.17, kv=150, critical_tokens=1)
    assert flat._bucket(4).rewards["lookup/2"][-1] == pytest.approx(0.095 / 0.17, rel=0.02)  # 0.56: plain wins
    flat.record(4, "lookup/2", 11, 0.17, kv=150, critical_tokens=3)  # every row ran ahead
    assert flat._bucket(4).rewards["lookup/2"][-1] == pytest.approx(3 * 0.095 / 0.17, rel=0.02)

    per_row = StepSelector([PLAIN, "lookup/2"], min_samples=1)
    for _ in range(8):
        for rows in (16, 32, 64, 128):
            per_row.record(rows, PLAIN, rows, 1e-4 * rows, kv=150)
    assert per_row.plain_cost.fixed() == pytest.approx(0.0, abs=1e-5)
    per_row.record(64, "lookup/2", 128, 0.009, kv=150, critical_tokens=1)
    assert per_row._bucket(64).rewards["lookup/2"][-1] == pytest.approx(128 * 0.0064 / (64 * 0.009), rel=0.02)


def test_an_arm_that_pays_on_a_third_of_its_steps_is_valued_by_its_total_time_not_its_median():
    """SmolLM2-135M at 4 rows (traced): a lookup/4 step costs ~180 ms against a ~95 ms plain step;
    where the least-advanced row found a match it gains 5 tokens, else 1. Two steps in three gain 1
    (reward 0.53, the median), one gains 5 (2.6): over its steps the arm yields
    (1 + 1 + 5) * 95 ms of plain work in 540 ms, 1.23x plain, so it is chosen."""
    s = StepSelector([PLAIN, "lookup/4"], min_samples=3, window=12)
    for _ in range(8):
        for rows in (1, 2, 3, 4):
            s.record(rows, PLAIN, rows, 0.095, kv=150)
    for crit in (1, 1, 5) * 4:
        s.record(4, "lookup/4", 4 * crit, 0.18, kv=150, critical_tokens=crit)
    rewards = sorted(s._bucket(4).rewards["lookup/4"])
    assert rewards[len(rewards) // 2] == pytest.approx(0.095 / 0.18, rel=0.02)  # the median: plain would win
    assert s.table()[3]["lookup/4"] == pytest.approx(7 * 0.095 / (3 * 0.18), rel=0.02)
    assert s.best(4) == "lookup/4"
    s.record(4, "lookup/4", 4, 30.0, kv=150, critical_tokens=1)  # one 30 s stall of the OS ...
    assert s.table()[3]["lookup/4"] > 0.9  # ... weighs as 4 median steps, not 166


def test_plain_step_cost_is_exponentially_weighted_least_squares():
    """The recursive fit equals the closed form: theta = argmin sum_t forget^(T-t) (y_t - x_t theta)^2
    (plus the vanishing prior of the initial P = 1e3 I)."""
    rng = random.Random(0)
    c = PlainStepCost(forget=0.98)
    xs, ys = [], []
    for _ in range(300):
        rows, kv = rng.randint(1, 128), rng.randint(10, 600)
        y = 0.002 + 3e-5 * rows + 2e-7 * rows * kv + rng.gauss(0, 1e-4)
        c.observe(rows, kv, y)
        xs.append(c._features(rows, kv))
        ys.append(y)
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    w = 0.98 ** torch.arange(len(ys) - 1, -1, -1, dtype=torch.float64)
    prior = 0.98 ** len(ys) / 1e3 * torch.eye(3, dtype=torch.float64)
    theta = torch.linalg.solve(x.T @ (w[:, None] * x) + prior, x.T @ (w * y))
    assert c.theta == pytest.approx(theta.tolist(), rel=1e-6, abs=1e-12)
    assert c.predict(64, 300) == pytest.approx(float(torch.tensor(c._features(64, 300), dtype=torch.float64) @ theta),
                                               rel=1e-6)


def test_a_draft_arm_gets_its_samples_from_the_first_plain_step_on():
    """Every draft step is scored once one plain step was seen (a draft arm whose steps could not
    be scored would stay 'untried' and be chosen at every step)."""
    s = StepSelector([PLAIN, "lookup/2"], min_samples=2)
    picks = []
    for _ in range(6):
        arm = s.select(256)
        picks.append(arm)
        s.record(256, arm, 256 if arm == PLAIN else 300, 0.01 if arm == PLAIN else 0.03, kv=300)
    assert picks[:4] == [PLAIN, PLAIN, "lookup/2", "lookup/2"] and picks[4:] == [PLAIN, PLAIN]


def test_per_source_counters_add_up_over_a_steps_rollout_calls():
    from rlspec.rollout.base import merge_stats

    a = {"tokens": 10, "decode_steps": 5, "spec/sd_steps": 2, "spec/draft_seconds": 0.5,
         "spec/self/drafted": 8, "spec/self/accepted": 4, "spec/self/rows": 4, "spec/self/accept_length": 2.0}
    b = {"tokens": 10, "decode_steps": 5, "spec/sd_steps": 1, "spec/draft_seconds": 0.25,
         "spec/self/drafted": 4, "spec/self/accepted": 0, "spec/self/rows": 4, "spec/self/accept_length": 1.0}
    m = merge_stats([a, b])
    assert (m["spec/self/drafted"], m["spec/self/accepted"], m["spec/self/rows"]) == (12, 4, 8)
    assert m["spec/self/accept_length"] == 1.5 and m["spec/draft_seconds"] == 0.75  # (4 + 8) / 8
