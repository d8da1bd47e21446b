"""NativeEngine: fast-path forward vs HF, greedy vs HF generate, logprobs, stopping, batching."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlspec.errors import ConfigError, DataError
from rlspec.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutResultWithHidden, SamplingParams
from rlspec.rollout.engines import make_engine
from rlspec.rollout.native import NativeEngine
import rlspec.rollout.fast_backend as fast_backend
from rlspec.rollout.fast_backend import LlamaFastBackend

V = 128
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def _build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True))  # q/k/v bias, tied embeddings
        assert model.lm_head.weight is model.model.embed_tokens.weight
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False, attention_bias=True,
                                             rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    elif kind == "llama3rope":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        model = LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=rope))
    elif kind == "yarnrope":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
        model = LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=rope))
    elif kind == "linearrope":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                       "factor": 2.0}))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=32))  # q/k norm, head_dim != hidden/heads
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                           bos_token_id=0, eos_token_id=1))
    else:
        raise ValueError(kind)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, which only add contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen2():
    return _build("qwen2")


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in lengths]


def _left_pad(seqs, pad=0):
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def _hf_last_logits(model, seqs):
    """HF forward on left-padded sequences; logits at the last position of each."""
    ids, mask = _left_pad(seqs)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]


def _hf_greedy(model, prompts, max_new, eos=None):
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=0)
    res = []
    for row in out[:, ids.shape[1]:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        res.append(row)
    return res


# ------------------------------------------------------------------------ fast forward vs HF


@pytest.mark.parametrize(
    "kind,attention",
    [("qwen2", "math"), ("qwen2", "sdpa"), ("llama", "math"), ("llama3rope", "sdpa"), ("yarnrope", "math"),
     ("linearrope", "math"), ("qwen3", "math"), ("qwen3", "sdpa"), ("mistral", "math")],
)
def test_fast_forward_logits_match_hf(kind, attention):
    model = _build(kind)
    # llama covers the fused-weights path, the others the default (parameters read in place)
    backend = LlamaFastBackend(model, fuse_weights=kind == "llama", cache_attention=attention)
    prompts = _prompts([3, 9, 6, 1])
    seqs = [list(p) for p in prompts]
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        backend.begin(num_slots=4, max_len=32)
        logits, _ = backend.prefill([prompts[0], prompts[1]], want_hidden=False)  # two waves of prefill
        logits2, _ = backend.prefill([prompts[2], prompts[3]], want_hidden=False)
        logits = torch.cat([logits, logits2])
        worst = (logits - _hf_last_logits(model, seqs)).abs().max().item()
        rows = list(range(4))
        for step in range(5):
            if step == 2:  # a sequence finishes: the batch is compacted
                order = backend.remove([1])
                rows = [rows[i] for i in order]
            if step == 3:  # a new prompt joins the running batch
                new = _prompts([7], seed=9)[0]
                seqs.append(list(new))
                extra, _ = backend.prefill([new], want_hidden=False)
                rows.append(len(seqs) - 1)
                worst = max(worst, (extra - _hf_last_logits(model, [new])).abs().max().item())
            tokens = torch.randint(0, V, (len(rows),), generator=g)
            for r, t in zip(rows, tokens.tolist()):
                seqs[r].append(t)
            logits, _ = backend.decode(tokens, want_hidden=False)
            ref = _hf_last_logits(model, [seqs[r] for r in rows])
            worst = max(worst, (logits - ref).abs().max().item())
        backend.end()
    assert worst < 1e-4, worst


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_fast_forward_several_new_tokens_per_row(attention):
    """The verification-shaped call (Q tokens per row over the cache) that speculative decoding uses."""
    model = _build("qwen3")
    backend = LlamaFastBackend(model, cache_attention=attention)
    prompts = _prompts([4, 7, 2])
    new = torch.randint(0, V, (3, 3), generator=torch.Generator().manual_seed(2))  # 3 tokens per row
    with torch.inference_mode():
        backend.begin(num_slots=3, max_len=16)
        backend.prefill(prompts, want_hidden=False)
        lens = torch.tensor([len(p) for p in prompts])
        positions = lens[:, None] + torch.arange(3)  # [n, Q]
        kv_len = int(positions.max()) + 1
        mask = (torch.arange(kv_len)[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # causal, per row
        hidden = backend.forward(new, positions, slice(0, 3), mask, kv_len)
        logits = backend.logits(hidden)  # [n, Q, V]
    worst = 0.0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([p + new[i].tolist()])).logits[0, len(p):]
        worst = max(worst, (logits[i] - ref).abs().max().item())
    assert worst < 1e-4, worst


# --------------------------------------------------------------------- greedy vs HF generate


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_equals_hf_generate(qwen2, fast):
    prompts = _prompts([5, 11, 2, 8, 3])
    engine = NativeEngine(qwen2, eos_token_ids=[], fast_path=fast)
    res = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0))
    assert engine.last_backend == ("fast" if fast else "generic")
    assert res.response_ids == _hf_greedy(qwen2, prompts, 20)
    assert res.finish_reasons == [FINISH_LENGTH] * 5
    assert res.prompt_ids == prompts
    assert res.response_lengths == [20] * 5
    assert all(lp.dtype == torch.float32 and lp.shape == (20,) for lp in res.response_logprobs)
    assert res.stats["tokens"] == 100 and res.stats["tokens_per_s"] > 0


def test_generic_path_on_a_non_llama_model():
    model = _build("gpt2")
    engine = NativeEngine(model, eos_token_ids=[1], max_batch_size=2)
    assert engine.fast is None and "GPT2LMHeadModel" in engine.fast_unsupported
    prompts = _prompts([4, 9, 6, 2])
    res = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    assert engine.last_backend == "generic"
    assert res.response_ids == _hf_greedy(model, prompts, 12, eos=1)


def test_unsupported_rope_falls_back_to_generic():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                   "factor": 2.0})).eval()
    engine = NativeEngine(model, eos_token_ids=[])
    assert engine.fast is None and "dynamic" in engine.fast_unsupported
    prompts = _prompts([3, 6])
    res = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    assert res.response_ids == _hf_greedy(model, prompts, 8)
    with pytest.raises(ConfigError, match="fast path"):
        NativeEngine(model, eos_token_ids=[], fast_path=True)


def test_sliding_window_longer_than_window_uses_generic():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**SMALL, "sliding_window": 12})).eval()
    engine = NativeEngine(model, eos_token_ids=[])
    prompts = _prompts([4, 7])
    short = engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))
    assert engine.last_backend == "fast"
    assert short.response_ids == _hf_greedy(model, prompts, 4)
    engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert engine.last_backend == "generic"


# ---------------------------------------------------------------------- sampling / logprobs


@pytest.mark.parametrize("fast", [True, False])
def test_sampled_logprobs_equal_full_forward(qwen2, fast):
    prompts = _prompts([4, 10, 7])
    params = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=50, seed=3)
    res = NativeEngine(qwen2, eos_token_ids=[], fast_path=fast).generate(prompts, params)
    worst = 0.0
    for p, r, lp in zip(prompts, res.response_ids, res.response_logprobs):
        with torch.no_grad():
            logits = qwen2(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]  # predicts r
        ref = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        worst = max(worst, (ref - lp).abs().max().item())
    assert worst < 1e-4, worst


def test_greedy_logprobs_use_temperature_one(qwen2):
    prompts = _prompts([5])
    res = NativeEngine(qwen2, eos_token_ids=[]).generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))
    p, r = prompts[0], res.response_ids[0]
    with torch.no_grad():
        logits = qwen2(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
    assert (ref - res.response_logprobs[0]).abs().max().item() < 1e-4


def test_seed_makes_sampling_reproducible(qwen2):
    prompts = _prompts([3, 8, 5, 6])
    engine = NativeEngine(qwen2, eos_token_ids=[], max_batch_size=3)
    a = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=11))
    b = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=11))
    c = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=12))
    assert a.response_ids == b.response_ids
    assert all(torch.equal(x, y) for x, y in zip(a.response_logprobs, b.response_logprobs))
    assert a.response_ids != c.response_ids


def test_top_k_one_equals_greedy(qwen2):
    prompts = _prompts([6, 2, 9])
    engine = NativeEngine(qwen2, eos_token_ids=[])
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    topk1 = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=0))
    assert topk1.response_ids == greedy.response_ids
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(topk1.response_logprobs, greedy.response_logprobs))


# ------------------------------------------------------------------------------- stopping


def _pick_eos(outputs):
    """A token that ends some rows early and not others, from greedy outputs without EOS."""
    for t in outputs[0][2:]:
        if any(t not in row for row in outputs):
            return t
    raise AssertionError("no usable EOS candidate")


@pytest.mark.parametrize("fast", [True, False])
def test_eos_stops_a_row_and_others_continue(qwen2, fast):
    prompts = _prompts([5, 9, 3, 7, 4, 6])
    engine = NativeEngine(qwen2, eos_token_ids=[], fast_path=fast)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0)).response_ids
    eos = _pick_eos(free)
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in free]
    engine = NativeEngine(qwen2, eos_token_ids=[eos], fast_path=fast)
    res = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0))
    assert res.response_ids == expected
    assert res.finish_reasons == [FINISH_STOP if eos in row else FINISH_LENGTH for row in free]
    assert FINISH_STOP in res.finish_reasons and FINISH_LENGTH in res.finish_reasons
    assert [len(lp) for lp in res.response_logprobs] == [len(r) for r in expected]
    assert res.response_ids == _hf_greedy(qwen2, prompts, 16, eos=eos)


def test_finished_rows_leave_the_batch(qwen2):
    prompts = _prompts([5, 9, 3, 7, 4, 6])
    engine = NativeEngine(qwen2, eos_token_ids=[])
    free = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0)).response_ids
    eos = _pick_eos(free)
    engine = NativeEngine(qwen2, eos_token_ids=[eos])
    sizes = []
    decode = engine.fast.decode
    engine.fast.decode = lambda tokens, want_hidden: (sizes.append(len(tokens)), decode(tokens, want_hidden))[1]
    res = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0))
    # decode step s feeds response token s; rows still running then = rows longer than s tokens
    assert sizes == [sum(len(r) > s for r in res.response_ids) for s in range(1, 16)]
    assert sizes[-1] < len(prompts)


class _PieceTokenizer:
    """Each id decodes to a fixed 2-character piece, so a stop string can span two tokens."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) + chr(ord("A") + (i // 26) % 26) for i in ids)


@pytest.mark.parametrize("fast", [True, False])
def test_stop_strings(qwen2, fast):
    tok = _PieceTokenizer()
    prompts = _prompts([5, 8, 4])
    engine = NativeEngine(qwen2, eos_token_ids=[], tokenizer=tok, fast_path=fast)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0)).response_ids
    stop = tok.decode(free[0][3:5])[1:3]  # last char of token 3 + first char of token 4
    expected, reasons = [], []
    for row in free:
        cut = next((i + 1 for i in range(len(row)) if stop in tok.decode(row[: i + 1])), None)
        expected.append(row[:cut] if cut else row)
        reasons.append(FINISH_STOP if cut else FINISH_LENGTH)
    res = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0, stop_strings=(stop, "zzzz")))
    assert res.response_ids == expected
    assert res.finish_reasons == reasons
    assert len(res.response_ids[0]) <= 5
    assert stop in tok.decode(res.response_ids[0]) and stop not in tok.decode(res.response_ids[0][:-1])


def test_stop_strings_need_a_tokenizer(qwen2):
    with pytest.raises(ConfigError, match="tokenizer"):
        NativeEngine(qwen2, eos_token_ids=[]).generate([[1, 2]], SamplingParams(stop_strings=("x",)))


# ---------------------------------------------------------------------- continuous batching


@pytest.mark.parametrize("fast", [True, False])
def test_more_prompts_than_slots_gives_same_greedy_outputs(qwen2, fast):
    prompts = _prompts([5, 9, 3, 7, 4, 6, 10, 2, 8, 5])
    free = NativeEngine(qwen2, eos_token_ids=[]).generate(prompts, SamplingParams(max_new_tokens=14, temperature=0.0))
    eos = _pick_eos(free.response_ids)  # rows finish at different times, so slots free up unevenly
    params = SamplingParams(max_new_tokens=14, temperature=0.0)
    big = NativeEngine(qwen2, eos_token_ids=[eos], max_batch_size=64, fast_path=fast).generate(prompts, params)
    small = NativeEngine(qwen2, eos_token_ids=[eos], max_batch_size=3, fast_path=fast).generate(prompts, params)
    assert small.response_ids == big.response_ids
    assert small.finish_reasons == big.finish_reasons
    assert small.stats["decode_steps"] > big.stats["decode_steps"]
    for a, b in zip(small.response_logprobs, big.response_logprobs):
        assert torch.allclose(a, b, atol=1e-4)


def test_small_prefill_budget_chunks_admission(qwen2):
    prompts = _prompts([5, 9, 3, 7, 4])
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    ref = NativeEngine(qwen2, eos_token_ids=[]).generate(prompts, params)
    chunked = NativeEngine(qwen2, eos_token_ids=[], prefill_tokens=10).generate(prompts, params)
    assert chunked.response_ids == ref.response_ids


# ---------------------------------------------------------------------- weights / features


def test_weight_updates_are_seen():
    model = _build("qwen2", seed=4)
    prompts = _prompts([4, 7, 5])
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    fused = NativeEngine(model, eos_token_ids=[], fuse_weights=True)
    in_place = NativeEngine(model, eos_token_ids=[], fuse_weights=False)
    g = torch.Generator().manual_seed(0)

    def perturb(through_data: bool = False):
        with torch.no_grad():
            for p in model.parameters():
                (p.data if through_data else p).add_(torch.randn(p.shape, generator=g) * 0.05)
        return _hf_greedy(model, prompts, 10)

    before = fused.generate(prompts, params).response_ids
    expected = perturb()  # an optimizer step (in place; bumps the tensors' version counters)
    assert expected != before
    assert in_place.generate(prompts, params).response_ids == expected  # parameters read in place
    assert fused.generate(prompts, params).response_ids == expected  # fused copies rebuilt on the change
    expected = perturb(through_data=True)  # invisible to version counters: update_weights is the contract
    fused.update_weights()
    assert fused.generate(prompts, params).response_ids == expected
    with torch.no_grad():  # a replaced parameter object is picked up as well
        layer = model.model.layers[0].mlp.down_proj
        layer.weight = torch.nn.Parameter(layer.weight * 1.5)
    assert in_place.generate(prompts, params).response_ids == _hf_greedy(model, prompts, 10)


@pytest.mark.parametrize("fast", [True, False])
def test_return_hidden_states(qwen2, fast):
    prompts = _prompts([4, 9, 6])
    engine = NativeEngine(qwen2, eos_token_ids=[], fast_path=fast, max_batch_size=2)
    res = engine.generate(prompts, SamplingParams(max_new_tokens=7, seed=0), return_hidden_states=True)
    assert isinstance(res, RolloutResultWithHidden)
    for p, r, h in zip(prompts, res.response_ids, res.response_hidden_states):
        with torch.no_grad():
            ref = qwen2(torch.tensor([p + r]), output_hidden_states=True).hidden_states[-1][0]
        assert h.shape == (len(r), 64)
        assert (h - ref[len(p) - 1 : -1]).abs().max().item() < 1e-4
    assert not h.is_inference()


def test_outputs_are_normal_tensors(qwen2):
    res = NativeEngine(qwen2, eos_token_ids=[]).generate(_prompts([3]), SamplingParams(max_new_tokens=3))
    lp = res.response_logprobs[0]
    assert not lp.is_inference()
    w = torch.ones(3, requires_grad=True)
    (w * lp).sum().backward()  # usable in the trainer's autograd graph


def test_bad_inputs(qwen2):
    engine = NativeEngine(qwen2, eos_token_ids=[])
    with pytest.raises(DataError, match="empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(DataError, match="vocabulary"):
        engine.generate([[1, V]], SamplingParams())
    with pytest.raises(ConfigError, match="max_batch_size"):
        NativeEngine(qwen2, eos_token_ids=[], max_batch_size=0)
    with pytest.raises(ConfigError, match="pad_token_id"):
        NativeEngine(qwen2, eos_token_ids=[], pad_token_id=V)
    empty = engine.generate([], SamplingParams())
    assert empty.response_ids == [] and empty.stats["tokens"] == 0


def test_make_engine(qwen2):
    engine = make_engine("native", qwen2, None, eos_token_ids=[3], max_batch_size=4)
    assert isinstance(engine, NativeEngine) and engine.eos_token_ids == [3] and engine.max_batch_size == 4
    with pytest.raises(ConfigError, match="native"):
        make_engine("vllmm", qwen2, None)


@pytest.mark.parametrize("fast", [True, False])
def test_one_new_token_and_eos_as_first_token(qwen2, fast):
    prompts = _prompts([4, 6, 3, 5])
    engine = NativeEngine(qwen2, eos_token_ids=[], fast_path=fast, max_batch_size=2)
    first = engine.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0.0))
    assert [len(r) for r in first.response_ids] == [1] * 4 and first.finish_reasons == [FINISH_LENGTH] * 4
    assert first.stats["decode_steps"] == 0
    eos = first.response_ids[0][0]  # row 0 stops on its very first token, the others run on
    res = NativeEngine(qwen2, eos_token_ids=[eos], fast_path=fast, max_batch_size=2).generate(
        prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert res.response_ids[0] == [eos] and res.finish_reasons[0] == FINISH_STOP
    assert res.response_ids == _hf_greedy(qwen2, prompts, 5, eos=eos)


# ----------------------------------------------------------------- small-row linear (CPU decode)


@pytest.mark.parametrize("bias", [False, True])
def test_small_row_linear_equals_f_linear(monkeypatch, bias):
    monkeypatch.setattr(fast_backend, "SMALL_ROW_LINEAR", True)
    monkeypatch.setattr(fast_backend, "SMALL_LINEAR_MIN_WEIGHT", 0)  # every weight takes the (W @ x^T)^T path
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    b = torch.randn(24, generator=g) if bias else None
    for lead in [(16,), (1, 16), (3, 16), (2, 4, 16), (1, 48, 16), (7, 7, 16), (0, 16)]:  # 49 rows: F.linear
        x = torch.randn(*lead, generator=g)
        out = fast_backend.linear(x, w, b)
        assert out.shape == (*lead[:-1], 24) and out.is_contiguous()
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
    x16 = torch.randn(3, 16, generator=g).bfloat16()  # dtype mismatch: left to F.linear's error/handling
    with pytest.raises(RuntimeError):
        fast_backend.linear(x16, w, b)


def test_small_row_linear_is_on_for_amd_cpus_unless_the_env_says_otherwise(monkeypatch):
    assert fast_backend.small_row_linear_default("auto", "AuthenticAMD") is True
    assert fast_backend.small_row_linear_default("auto", "GenuineIntel") is False
    assert fast_backend.small_row_linear_default("1", "GenuineIntel") is True
    assert fast_backend.small_row_linear_default(" off ", "AuthenticAMD") is False
    with pytest.raises(ConfigError, match="RLSPEC_SMALL_ROW_LINEAR='fast'"):
        fast_backend.small_row_linear_default("fast", "AuthenticAMD")
    # off: F.linear for every input, whatever its size
    monkeypatch.setattr(fast_backend, "SMALL_ROW_LINEAR", False)
    monkeypatch.setattr(fast_backend, "SMALL_LINEAR_MIN_WEIGHT", 0)
    monkeypatch.setattr(fast_backend.torch, "mm", lambda *a: pytest.fail("took the (W @ x^T)^T path"))
    w, x = torch.randn(24, 16), torch.randn(3, 16)
    assert torch.equal(fast_backend.linear(x, w), torch.nn.functional.linear(x, w))


def test_fast_forward_with_small_row_linear_matches_hf(monkeypatch):
    """The decode and verification forwards of a model whose weights take the small-row path."""
    monkeypatch.setattr(fast_backend, "SMALL_ROW_LINEAR", True)
    monkeypatch.setattr(fast_backend, "SMALL_LINEAR_MIN_WEIGHT", 0)
    for kind, attention in [("qwen2", "math"), ("llama", "math"), ("qwen3", "sdpa")]:
        test_fast_forward_logits_match_hf(kind, attention)
    test_fast_forward_several_new_tokens_per_row("math")
