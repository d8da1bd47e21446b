"""The CUDA paths (issue 21), skipped without a CUDA device: the native engine against
``model.generate`` and the trainer's forward, lossless speculation, and a training run on the GPU
with checkpoint and resume. ``scripts/gpu_check.sh`` runs them on a lent GPU."""

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from conftest import TINY_OVERRIDES, compose_config  # noqa: E402
from rlspec.config import SpeculativeConfig  # noqa: E402
from rlspec.data import build_prompt_ids, load_split  # noqa: E402
from rlspec.models import eos_token_ids, load_causal_lm, load_tokenizer  # noqa: E402
from rlspec.rollout.base import SamplingParams  # noqa: E402
from rlspec.rollout.native import NativeEngine  # noqa: E402
from rlspec.session import build_trainer  # noqa: E402


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def cuda_setup(request, tiny_model_path):
    model = load_causal_lm(str(tiny_model_path), request.param).to("cuda").eval()
    tok = load_tokenizer(str(tiny_model_path))
    rows = load_split(str(tiny_model_path), "test", "question", "answer")[:8]
    prompts = build_prompt_ids(tok, rows, None)
    return model, tok, eos_token_ids(model, tok), prompts, request.param


def test_native_engine_on_cuda_is_greedy_identical_and_its_logprobs_are_the_forwards(cuda_setup):
    model, tok, eos, prompts, dtype = cuda_setup
    params = SamplingParams(max_new_tokens=48, temperature=0)
    out = NativeEngine(model, eos, tokenizer=tok).generate(prompts, params)
    for prompt, response, logprobs in zip(prompts, out.response_ids, out.response_logprobs):
        ids = torch.tensor([prompt], device="cuda")
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0])[0, len(prompt):].tolist()
        ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
        if dtype == "float32":  # bf16 ties may break differently between a cached and a full forward
            assert response == ref
        full = torch.tensor([prompt + response], device="cuda")
        with torch.no_grad():
            logits = model(full).logits[0, len(prompt) - 1 : -1].float()
        forward = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response, device="cuda")[:, None])[:, 0]
        tol = 1e-3 if dtype == "float32" else 5e-2
        assert torch.allclose(torch.as_tensor(logprobs).float().cuda(), forward, atol=tol)


def test_lookup_speculation_on_cuda_is_lossless(cuda_setup):
    model, tok, eos, prompts, _ = cuda_setup
    spec = SpeculativeConfig(enable=True, mode="always", sources=["self", "group", "history"])
    plain, fast = NativeEngine(model, eos, tokenizer=tok), NativeEngine(model, eos, tokenizer=tok, speculative=spec)
    greedy = SamplingParams(max_new_tokens=64, temperature=0)
    assert fast.generate(prompts, greedy).response_ids == plain.generate(prompts, greedy).response_ids
    sampled = SamplingParams(max_new_tokens=64, temperature=1.0, seed=3)  # coupled: the plain run's tokens
    same = [a == b for a, b in zip(fast.generate(prompts, sampled).response_ids,
                                   plain.generate(prompts, sampled).response_ids)]
    assert sum(same) >= len(same) - 1  # float rounding may move one sample at a CDF boundary


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_dler_steps_on_cuda_checkpoint_and_resume(tiny_model_path, tmp_path, dtype):
    over = [*TINY_OVERRIDES, f"run_dir={tmp_path}", "+recipe=dler", "model.device=auto", f"model.dtype={dtype}",
            "eval.at_start=false", "eval.at_end=false", "trainer.mini_batch_size=null",
            "trainer.filter_groups.enable=false"]  # the tiny model's groups are rarely informative
    trainer = build_trainer(compose_config(over), tmp_path)
    assert next(trainer.model.parameters()).device.type == "cuda"
    metrics = [trainer.train_step() for _ in range(2)]
    assert all(m["actor/num_updates"] >= 1 and m["actor/grad_norm"] == m["actor/grad_norm"] for m in metrics)
    trainer.save()
    assert (tmp_path / "checkpoints" / "step_000002" / "model").is_dir()
    resumed = build_trainer(compose_config([*over, "trainer.steps=3"]), tmp_path)
    assert resumed.maybe_resume() is not None and resumed.global_step == 2
    assert next(resumed.model.parameters()).device.type == "cuda"
    resumed.train_step()
    assert resumed.global_step == 3
