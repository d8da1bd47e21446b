"""The TRL side of ``bench/vs_trl.py``: time GRPO steps of ``trl.GRPOTrainer`` (HF generate).

TRL is configured as fast as it goes on a CPU (cpu-platform.md Sec. 3): fp32 (``bf16=False``;
bf16 is ~10x slower on CPUs without native bf16), ``use_cpu=True``, no gradient checkpointing
(~15 % faster at these sizes), no reference model (``beta=0``), no logging, no checkpoints,
no dataloader workers. The loss is DAPO's token-mean with clip-higher (``loss_type="dapo"``,
``epsilon=0.2``, ``epsilon_high=0.28``). With ``gradient_accumulation_steps == steps_per_generation``
and one PPO epoch TRL skips the old-logprob forward (it uses the current logprobs, detached).

One TRL step = one optimizer step = one generation batch of ``prompts_per_step * num_generations``
completions (generated in one ``model.generate`` call), scored, then trained on in
``ceil(batch / micro_batch_size)`` micro-batches.

Step time is measured between consecutive ``on_step_end`` callbacks (so it includes every
per-step cost: data, generation, reward, loss, backward, optimizer), after ``warmup_steps``
untimed steps.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)


@dataclass
class StepTiming:
    """Timed GRPO steps of one framework (both sides of the benchmark return this)."""

    framework: str
    step_seconds: list[float]  # wall time of each timed step
    completion_lengths: list[float]  # mean completion length (tokens) of each timed step
    accuracy: list[float] = field(default_factory=list)  # mean correctness reward of each timed step
    warmup_seconds: float = 0.0  # total wall time of the untimed warm-up steps
    setup_seconds: float = 0.0  # building the trainer (model load etc.), not in the step times
    phase_seconds: dict[str, list[float]] = field(default_factory=dict)  # rlspec: rollout / reward / train per step

    @property
    def s_per_step(self) -> float:
        return statistics.fmean(self.step_seconds)

    @property
    def mean_completion_length(self) -> float:
        return statistics.fmean(self.completion_lengths)

    def summary(self) -> str:
        spread = f" (min {min(self.step_seconds):.3f}, max {max(self.step_seconds):.3f})"
        acc = f", accuracy {statistics.fmean(self.accuracy):.3f}" if self.accuracy else ""
        phases = "".join(f"; {name} {statistics.fmean(values):.2f} s" for name, values in self.phase_seconds.items())
        return (
            f"{self.framework}: {self.s_per_step:.3f} s/step over {len(self.step_seconds)} steps{spread}, "
            f"mean completion length {self.mean_completion_length:.1f} tokens{acc}; "
            f"setup {self.setup_seconds:.1f} s, warm-up {self.warmup_seconds:.2f} s{phases}"
        )


# ------------------------------------------------------------------------------------ reward


def _boxed_exact_match(response: str, gold: str) -> bool:
    """Fallback grader: the last ``\\boxed{...}`` (flat) equals the gold string exactly."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", response)
    return bool(found) and found[-1].strip() == str(gold).strip()


def correctness_grader() -> tuple[Callable[[str, str], bool], str]:
    """rlspec's grader (``rlspec.rewards.grader.grade``) when importable, else boxed exact match."""
    try:
        from rlspec.rewards.grader import grade
    except ImportError:
        return _boxed_exact_match, "boxed exact match (rlspec.rewards.grader not importable)"
    return grade, "rlspec.rewards.grader.grade"


class CorrectnessReward:
    """TRL reward function ``(completions, completion_ids, answer, ...) -> list[float]``, 0/1.

    Also records, per call (= per TRL step), the mean completion length in tokens and the mean
    reward, so the benchmark can report them without turning TRL's logging on.
    """

    __name__ = "correctness"

    def __init__(self, grade: Callable[[str, str], bool]) -> None:
        self.grade = grade
        self.lengths: list[float] = []
        self.accuracy: list[float] = []

    def __call__(self, completions: list, completion_ids: list, answer: list, **kwargs: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        scores = [1.0 if self.grade(t, a) else 0.0 for t, a in zip(texts, answer)]
        self.lengths.append(statistics.fmean(len(ids) for ids in completion_ids))
        self.accuracy.append(statistics.fmean(scores))
        return scores


# ------------------------------------------------------------------------------------ timing


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Timestamps of ``on_train_begin`` and of every ``on_step_end``."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    return StepClock()


def time_trl_steps(
    model_dir: str | Path,
    rows: Sequence[dict[str, Any]],
    *,
    num_generations: int,
    prompts_per_step: int,
    max_completion_length: int,
    temperature: float,
    steps: int,
    warmup_steps: int = 1,
    micro_batch_size: int | None = None,
    learning_rate: float = 2e-5,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    output_dir: str | Path | None = None,
) -> StepTiming:
    """Build a ``trl.GRPOTrainer`` on ``model_dir`` and time ``steps`` GRPO steps after a warm-up.

    Args:
        model_dir: an HF ``save_pretrained`` directory with the tokenizer and its chat template.
        rows: ``{"prompt": [chat messages], "answer": str}``; TRL takes them in this order
            (``shuffle_dataset=False``), ``prompts_per_step`` per step, cycling when exhausted.
        num_generations: completions per prompt (the GRPO group size).
        micro_batch_size: completions per forward/backward; ``None`` = the whole step at once.
            Must divide ``prompts_per_step * num_generations``.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"need steps >= 1 and warmup_steps >= 0, got {steps} and {warmup_steps}")
    batch = prompts_per_step * num_generations
    micro = micro_batch_size or batch
    if batch % micro:
        raise ValueError(f"micro_batch_size={micro} must divide prompts_per_step * num_generations = {batch}")
    grade, _ = correctness_grader()
    reward = CorrectnessReward(grade)
    clock = _step_clock()
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="rlspec-bench-trl-"))
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # transformers 5.23 deprecates the gradient_checkpointing name
        warnings.simplefilter("ignore", FutureWarning)
        config = GRPOConfig(
            output_dir=str(out),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=batch // micro,  # steps_per_generation defaults to this
            num_generations=num_generations,
            max_completion_length=max_completion_length,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_steps=warmup_steps + steps,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            beta=0.0,
            loss_type="dapo",
            epsilon=0.2,
            epsilon_high=0.28,
            scale_rewards="group",
            shuffle_dataset=False,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=seed,
        )
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=[reward],
            args=config,
            train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows]),
            processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
            callbacks=[clock],
        )
    setup = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    stamps = clock.stamps
    if len(stamps) != warmup_steps + steps + 1 or len(reward.lengths) != warmup_steps + steps:
        raise RuntimeError(
            f"TRL ran {len(stamps) - 1} steps / {len(reward.lengths)} reward calls, expected {warmup_steps + steps}"
        )
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    del trainer
    return StepTiming(
        framework="trl",
        step_seconds=durations[warmup_steps:],
        completion_lengths=reward.lengths[warmup_steps:],
        accuracy=reward.accuracy[warmup_steps:],
        warmup_seconds=sum(durations[:warmup_steps]),
        setup_seconds=setup,
    )


# ------------------------------------------------------------------------------- tiny model


def build_random_tiny_qwen2(out_dir: str | Path, seed: int = 0) -> Path:
    """A random ~4 M-param Qwen2 with a ChatML BPE tokenizer (cpu-platform.md Sec. 3), for smoke runs.

    Random weights rarely sample EOS, so nearly every completion runs to max_completion_length.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = [
        f"What is {a} + {b}? Let me add. {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        for a in range(40)
        for b in range(40)
    ]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=2048,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tok.chat_template = CHATML_TEMPLATE
    hf_tok.padding_side = "left"
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(hf_tok),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out
