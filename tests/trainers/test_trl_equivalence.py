"""rlspec's policy loss and GRPO advantages equal TRL's, computed by TRL's own code.

A real ``trl.GRPOTrainer`` (trl 1.16) is built on a random tiny Qwen2 saved to a tmp dir. Its
``compute_loss`` is called on hand-built inputs (the keys ``_generate_and_score_completions``
produces) and compared with rlspec's pure functions on the same model forward:

    logits  = model(prompt + completion).logits            (the un-fused HF forward)
    logp    = token_logprobs_and_entropy(logits, completion, temperature)   # TRL: logits / T
    L_t     = ppo_clip_policy_loss(logp, old, A, clip_ratio_low=epsilon, clip_ratio_high=epsilon_high)
    loss    = aggregate_loss(L_t, mask, MODE[loss_type], normalizer)

TRL ``loss_type`` <-> rlspec ``loss_agg_mode``: dapo/bnpo <-> token-mean, grpo <->
seq-mean-token-mean, dr_grpo <-> seq-mean-token-sum-norm (with max_response_length =
max_completion_length). Loss values, gradients of several parameters and TRL's logged clip
fractions / entropy are compared at 1e-5.

Gradient accumulation: TRL's ``dapo`` divides every micro-batch by the token count of the whole
generation batch (``num_items_in_batch``), which is rlspec's ``LossNormalizer`` of the mini-batch.
TRL's ``bnpo`` divides each micro-batch by its *own* token count and then by the number of
micro-batches, so under accumulation it is a mean of per-micro-batch token-means, not a global
token-mean (see ``test_gradient_accumulation_normalisation``).

Advantages: TRL computes them inline in ``_generate_and_score_completions`` (no separate function),
so the test runs that method for real, with a reward function that returns fixture rewards.
``scale_rewards="group"`` is ``(r - mean_g) / (std_g + 1e-4)`` with the unbiased std = rlspec's
``grpo_advantages(eps=1e-4)`` (rlspec's default eps is 1e-6). ``scale_rewards="batch"`` is
``(r - mean_g) / (std_batch(r) + 1e-4)``: the std of the *raw* rewards over the batch, and no batch
re-centering. It is not DLER's batch-wise normalisation (rlspec ``batch_norm``), which whitens the
group-centred rewards ``s = r - mean_g`` with the batch mean and std of ``s``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import trl
from datasets import Dataset
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rlspec.trainers.advantages import batch_normalized_advantages, grpo_advantages
from rlspec.trainers.losses import (
    LossNormalizer,
    aggregate_loss,
    ppo_clip_policy_loss,
    token_logprobs_and_entropy,
)

TRL_TO_RLSPEC_MODE = {
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
EPSILON, EPSILON_HIGH = 0.2, 0.28
TEMPERATURE = 0.7
MAX_COMPLETION_LENGTH = 9  # > the completion width used below, so dr_grpo's constant matters
ATOL = RTOL = 1e-5
GRAD_PARAMS = (  # tied embedding/lm_head, first attention, last MLP, final norm
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (how TRL reports clip fractions and entropy)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These ops are tiny: one thread is several times faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = [f"What is {a} + {b}? The answer is \\boxed{{{a + b}}}." for a in range(12) for b in range(12)]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.padding_side = "left"
    return hf_tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2 (GQA, tied embeddings) and a ChatML tokenizer, saved like a hub model."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tok = _build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _constant_reward(completions, **kwargs) -> list[float]:
    return [0.0 for _ in completions]


def make_trainer(model_dir: Path, out_dir: Path, reward_funcs=None, **overrides) -> "trl.GRPOTrainer":
    """A real GRPOTrainer configured the way rlspec's bench runs TRL on CPU (fp32, no checkpointing)."""
    kwargs = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        num_generations=2,
        gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=TEMPERATURE,
        epsilon=EPSILON,
        epsilon_high=EPSILON_HIGH,
        beta=0.0,
        learning_rate=1e-5,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(
            model=str(model_dir),
            reward_funcs=reward_funcs or [_constant_reward],
            args=trl.GRPOConfig(**kwargs),
            train_dataset=Dataset.from_list(rows),
            processing_class=PreTrainedTokenizerFast.from_pretrained(str(model_dir)),
        )
    trainer.model.train()
    # Set by HF Trainer's training loop (len of the accumulation window); compute_loss reads it.
    trainer.current_gradient_accumulation_steps = kwargs["gradient_accumulation_steps"]
    return trainer


def make_batch(vocab_size: int, pad_id: int, seed: int, num_rows: int = 4, prompt_len: int = 5, width: int = 6):
    """Left-padded prompts, right-padded completions of different lengths (TRL's layout)."""
    g = torch.Generator().manual_seed(seed)
    high = vocab_size - 5  # ordinary tokens (the 5 specials are the first ids); any id works for a loss check
    prompt_ids = torch.randint(5, high, (num_rows, prompt_len), generator=g)
    prompt_mask = torch.ones(num_rows, prompt_len, dtype=torch.long)
    for row in range(num_rows):
        n_pad = row % 3  # 0, 1, 2 left pads
        prompt_ids[row, :n_pad] = pad_id
        prompt_mask[row, :n_pad] = 0
    lengths = [width, 2, 5, 1, 4, width, 3, 6][:num_rows]
    completion_ids = torch.randint(5, high, (num_rows, width), generator=g)
    completion_mask = torch.zeros(num_rows, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        completion_mask[row, :n] = 1
        completion_ids[row, n:] = pad_id
    advantages = torch.tensor([1.3, -0.8, 0.6, -1.5, 0.9, -0.4, 1.1, -1.2][:num_rows])
    return prompt_ids, prompt_mask, completion_ids, completion_mask, advantages


def rlspec_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """rlspec's path: one HF forward (original, not TRL's fused head), shift, temperature-scaled logprobs."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, P+C, V]
    p = prompt_ids.shape[1]
    return token_logprobs_and_entropy(logits[:, p - 1 : -1], completion_ids, temperature=TEMPERATURE)


def old_logprobs_for(model, batch, seed: int) -> torch.Tensor:
    """Current logprobs perturbed by U(-0.45, 0.45): ratios in [0.64, 1.57], so both clips fire."""
    with torch.no_grad():
        logp, _ = rlspec_logprobs(model, *batch[:4])
    g = torch.Generator().manual_seed(seed + 100)
    return logp + (torch.rand(logp.shape, generator=g) - 0.5) * 0.9


def grads_of(model) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name].grad.detach().clone() for name in GRAD_PARAMS}


def trl_inputs(batch, old, num_items_in_batch) -> dict[str, torch.Tensor]:
    prompt_ids, prompt_mask, completion_ids, completion_mask, advantages = batch
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": torch.tensor(float(num_items_in_batch)),
    }


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_policy_loss_and_grads_match_trl(model_dir: Path, tmp_path: Path, loss_type: str):
    trainer = make_trainer(model_dir, tmp_path, loss_type=loss_type)
    model = trainer.model
    batch = make_batch(model.config.vocab_size, trainer.processing_class.pad_token_id, seed=1)
    prompt_ids, prompt_mask, completion_ids, completion_mask, advantages = batch
    old = old_logprobs_for(model, batch, seed=1)
    mask = completion_mask.float()

    model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(model, trl_inputs(batch, old, completion_mask.sum()))
    trl_loss.backward()
    trl_grads = grads_of(model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model.zero_grad(set_to_none=True)
    logp, entropy = rlspec_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    out = ppo_clip_policy_loss(logp, old, advantages, clip_ratio_low=EPSILON, clip_ratio_high=EPSILON_HIGH)
    normalizer = LossNormalizer.of(mask, max_response_length=MAX_COMPLETION_LENGTH)
    loss = aggregate_loss(out.loss_mat, mask, TRL_TO_RLSPEC_MODE[loss_type], normalizer)
    loss.backward()
    rlspec_grads = grads_of(model)

    # The inputs exercise both clip bounds and both advantage signs.
    clip_low = masked_mean(out.clipped_low.float(), mask).item()
    clip_high = masked_mean(out.clipped_high.float(), mask).item()
    assert clip_low > 0 and clip_high > 0
    assert ((out.ratio - 1).abs() * mask).max() > 0.2

    torch.testing.assert_close(loss.detach(), trl_loss.detach(), atol=ATOL, rtol=RTOL)
    for name in GRAD_PARAMS:
        assert rlspec_grads[name].abs().max() > 0, name
        torch.testing.assert_close(rlspec_grads[name], trl_grads[name], atol=ATOL, rtol=RTOL, msg=name)
    assert trl_metrics["clip_ratio/low_mean"] == pytest.approx(clip_low, abs=1e-6)
    assert trl_metrics["clip_ratio/high_mean"] == pytest.approx(clip_high, abs=1e-6)
    assert trl_metrics["entropy"] == pytest.approx(masked_mean(entropy, mask).item(), abs=1e-5)


def test_loss_types_differ_on_this_batch(model_dir: Path):
    """Guards the test above: the four aggregations give different values on its inputs."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    model = Qwen2ForCausalLM.from_pretrained(str(model_dir))
    batch = make_batch(model.config.vocab_size, tok.pad_token_id, seed=1)
    old = old_logprobs_for(model, batch, seed=1)
    with torch.no_grad():
        logp, _ = rlspec_logprobs(model, *batch[:4])
    mask = batch[3].float()
    out = ppo_clip_policy_loss(logp, old, batch[4], clip_ratio_low=EPSILON, clip_ratio_high=EPSILON_HIGH)
    norm = LossNormalizer.of(mask, max_response_length=MAX_COMPLETION_LENGTH)
    values = {m: aggregate_loss(out.loss_mat, mask, m, norm).item() for m in set(TRL_TO_RLSPEC_MODE.values())}
    assert len({round(v, 4) for v in values.values()}) == 3, values


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_gradient_accumulation_normalisation(model_dir: Path, tmp_path: Path, loss_type: str):
    """Two micro-batches of 4 (gradient_accumulation_steps=2), one generation batch of 8.

    dapo / grpo / dr_grpo: the summed micro-batch losses equal rlspec's aggregate over the whole
    mini-batch (micro-batch losses use ``LossNormalizer.of(full mini-batch mask)``).
    bnpo: TRL gives the mean over micro-batches of each micro-batch's own token-mean, which is
    rlspec's token-mean with *per-micro-batch* normalisers divided by the number of micro-batches,
    and differs from the global token-mean when micro-batches hold different token counts.
    """
    trainer = make_trainer(
        model_dir, tmp_path, loss_type=loss_type, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    model = trainer.model
    full = make_batch(model.config.vocab_size, trainer.processing_class.pad_token_id, seed=2, num_rows=8)
    old_full = old_logprobs_for(model, full, seed=2)
    halves = [(tuple(t[s] for t in full), old_full[s]) for s in (slice(0, 4), slice(4, 8))]
    n_items = full[3].sum()
    mode = TRL_TO_RLSPEC_MODE[loss_type]
    global_norm = LossNormalizer.of(full[3].float(), max_response_length=MAX_COMPLETION_LENGTH)

    model.zero_grad(set_to_none=True)
    trl_total = 0.0
    for batch, old in halves:
        loss = trainer.compute_loss(model, trl_inputs(batch, old, n_items))
        loss.backward()
        trl_total += loss.item()
    trl_grads = grads_of(model)

    model.zero_grad(set_to_none=True)
    rlspec_total, local_total = 0.0, 0.0
    for batch, old in halves:
        mask = batch[3].float()
        logp, _ = rlspec_logprobs(model, *batch[:4])
        out = ppo_clip_policy_loss(logp, old, batch[4], clip_ratio_low=EPSILON, clip_ratio_high=EPSILON_HIGH)
        local_norm = LossNormalizer.of(mask, max_response_length=MAX_COMPLETION_LENGTH)
        local = aggregate_loss(out.loss_mat, mask, mode, local_norm) / len(halves)
        glob = aggregate_loss(out.loss_mat, mask, mode, global_norm)
        (local if loss_type == "bnpo" else glob).backward()
        rlspec_total += glob.item()
        local_total += local.item()
    rlspec_grads = grads_of(model)

    expected = local_total if loss_type == "bnpo" else rlspec_total
    assert trl_total == pytest.approx(expected, abs=ATOL, rel=RTOL)
    for name in GRAD_PARAMS:
        torch.testing.assert_close(rlspec_grads[name], trl_grads[name], atol=ATOL, rtol=RTOL, msg=name)
    if loss_type == "bnpo":  # micro-batches hold 14 and 19 tokens, so this is not the global token-mean
        assert abs(local_total - rlspec_total) > 1e-4


# --------------------------------------------------------------------------------- advantages

FIXTURE_REWARDS = [1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.5, 1.0, 1.0, 1.0, 1.0]  # 3 groups of 4


class _FixtureReward:
    """Returns FIXTURE_REWARDS in call order (TRL scores the whole generation batch in one call)."""

    __name__ = "fixture_reward"

    def __call__(self, completions, **kwargs) -> list[float]:
        assert len(completions) == len(FIXTURE_REWARDS)
        return list(FIXTURE_REWARDS)


def _trl_advantages(model_dir: Path, out_dir: Path, scale_rewards: str) -> torch.Tensor:
    trainer = make_trainer(
        model_dir,
        out_dir,
        reward_funcs=[_FixtureReward()],
        per_device_train_batch_size=12,
        num_generations=4,
        max_completion_length=2,
        scale_rewards=scale_rewards,
    )
    prompts = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(3)]
    generation_batch = [{"prompt": p} for p in prompts for _ in range(4)]  # RepeatSampler's order
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = trainer._generate_and_score_completions(generation_batch)
    return out["advantages"].float()


def test_group_advantages_match_trl(model_dir: Path, tmp_path: Path):
    trl_adv = _trl_advantages(model_dir, tmp_path, "group")
    rewards = torch.tensor(FIXTURE_REWARDS)
    group = torch.arange(3).repeat_interleave(4)
    torch.testing.assert_close(grpo_advantages(rewards, group, eps=1e-4), trl_adv, atol=1e-6, rtol=1e-6)
    assert trl_adv[8:].abs().max() == 0  # all-equal group -> no signal
    # rlspec's default eps (1e-6) differs from TRL's hard-coded 1e-4 by < 0.1 %:
    torch.testing.assert_close(grpo_advantages(rewards, group), trl_adv, atol=0, rtol=1e-3)


def test_trl_batch_scaling_is_not_dler_batch_normalisation(model_dir: Path, tmp_path: Path):
    trl_adv = _trl_advantages(model_dir, tmp_path, "batch")
    rewards = torch.tensor(FIXTURE_REWARDS)
    group = torch.arange(3).repeat_interleave(4)
    centred = rewards - rewards.view(3, 4).mean(1).repeat_interleave(4)
    # TRL: group-centred rewards over the (unbiased) std of the RAW rewards of the batch.
    torch.testing.assert_close(trl_adv, centred / (rewards.std() + 1e-4), atol=1e-6, rtol=1e-6)
    # DLER / rlspec batch_norm: whiten the group-centred rewards with THEIR batch statistics.
    dler = batch_normalized_advantages(rewards, group)
    torch.testing.assert_close(dler, centred / centred.std(), atol=1e-5, rtol=1e-5)
    assert (dler - trl_adv).abs().max() > 0.1
