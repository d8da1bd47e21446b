"""The training config: every key, its type, default and help text, defined once.

The YAML files under ``rlspec/configs/`` (Hydra groups and recipes) hold only what differs from
these defaults; :func:`validate_config` builds the typed :class:`RLSpecConfig` from the composed
config (an unknown key or a bad value fails at start with one line naming the key), and the
engines, rewards and trainers receive its sections as they are. ``python -m rlspec.train --help``
prints every key with its default and help. Names follow verl where one exists.

Names of pluggable pieces (advantage estimators, schedules, rollout hooks, bandit policies) are
checked against their registries (:mod:`rlspec.registry`), so this module imports no
implementation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlspec import registry
from rlspec.errors import ConfigError
from rlspec.guard_config import DivergenceConfig, NoLearningConfig, OverlongPrompts, check_group_size
from rlspec.method_config import AnytimeConfig, HbpoConfig
from rlspec.ppo_config import CriticConfig, GaeConfig
from rlspec.prompts import check_prompt_template
from rlspec.schema import build, choice_error, field_defaults, require, setting

Dtype = Literal["float32", "bfloat16", "float16"]
STANDARD_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."  # the papers' protocol


@dataclass
class ModelConfig:
    """The policy (and the reference model, a frozen copy of it)."""

    path: Optional[str] = setting(None, "HF save_pretrained dir, hub id or a .gguf file; null = the embedded "
                                        "default, built locally on first use")
    gguf_file: Optional[str] = setting(None, "a GGUF file inside model.path (dequantized to model.dtype)")
    embedded_preset: Literal["default", "tiny"] = setting("default", "embedded default variant (tiny: tests)")
    dtype: Dtype = setting("float32", "training and rollout dtype (bfloat16 is slower on CPUs without AMX)")
    trust_remote_code: bool = setting(False, "allow the model's own code from the hub")
    device: str = setting("auto", "auto (this rank's GPU when CUDA is available, else cpu) | cpu | cuda | cuda:N")

    def __post_init__(self) -> None:
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "model.device",
                f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class DataConfig:
    """Training prompts and the held-out split (columns ``question`` and ``answer``)."""

    path: Optional[str] = setting(None, "jsonl/json/parquet file, a directory or a hub dataset id; "
                                        "null = the embedded procedural math")
    split: str = setting("train", "split name (a directory's {split}.jsonl, a hub split)")
    test_path: Optional[str] = setting(None, "held-out data; null = the same source, split test_split")
    test_split: str = setting("test", "held-out split name")
    question_key: str = setting("question", "column holding the problem")
    answer_key: str = setting("answer", "column holding the gold answer")
    instruction: str = setting(STANDARD_INSTRUCTION, "appended to every question (the standard reasoning instruction)")
    max_train_samples: Optional[int] = setting(None, "use only the first N training rows")
    shuffle: bool = setting(True, "shuffle the prompts every epoch (seeded)")
    prompt_template: str = setting("chat", "chat (the tokenizer's) | r1_zero | plain (base models) | a string with {question}")
    overlong_prompts: OverlongPrompts = setting("error", "a prompt longer than the model's positions minus the "
                                                         "response length: error (naming file and row) | drop | off")

    def __post_init__(self) -> None:
        require(self.max_train_samples is None or self.max_train_samples > 0, "data.max_train_samples", "must be > 0")
        check_prompt_template(self.prompt_template)


@dataclass
class NamedSetting:
    """A registered piece chosen by ``name`` with its keyword arguments."""

    name: Optional[str] = setting(None, "registered name; null = off")
    kwargs: Dict[str, Any] = setting(help="keyword arguments of the named piece", default_factory=dict)


@dataclass
class BanditConfig:
    """The draft shape of each speculative step, chosen per batch-size bucket (TLT's BEG-MAB)."""

    policy: str = setting("bucketed_egreedy", "bucketed_egreedy (TLT's BEG) | ucb1 | fixed")
    buckets: Optional[List[int]] = setting(None, "batch-size lower bounds of the buckets, from 1; null = 1, 2, 5, 21")
    arms: Optional[Any] = setting(None, "draft shapes 'depth_topk_numverify' per bucket (a list of lists, or "
                                        "bucket -> list); null = chains on CPU, trees on GPU")
    epsilon: float = setting(0.1, "bucketed_egreedy: probability of a random arm")
    window: int = setting(300, "sliding window of rewards")
    window_scope: Literal["bucket", "arm"] = setting("bucket", "bucket: the last `window` pulls of the bucket; "
                                                               "arm: the last `window` rewards of each arm (TLT code)")
    group_by: Literal["bucket", "batch_size"] = setting("bucket", "one learner per bucket, or per batch-size "
                                                                  "group inside it (TLT's MABGroupManager)")
    fixed_arms: Optional[List[Any]] = setting(None, "policy fixed: one arm per bucket; null = the first of each")
    seed: int = setting(0, "seed of the exploration RNG")

    def __post_init__(self) -> None:
        registry.BANDIT_POLICIES.get(self.policy)  # an unknown name raises, listing the valid ones
        require(0 <= self.epsilon <= 1, "rollout.speculative.bandit.epsilon",
                f"must be a number in [0, 1] (exploration probability), got {self.epsilon!r}")
        require(self.window >= 1, "rollout.speculative.bandit.window",
                f"must be an int >= 1 (sliding window of pulls), got {self.window!r}")
        registry.CONFIG_CHECKS.get("rollout.speculative.bandit")(self)  # buckets, arms, fixed_arms


@dataclass
class OnlineDrafterConfig:
    """TLT's spot trainer: the drafter trains on the rollouts' hidden states during the long tail."""

    enable: bool = setting(True, "train the drafter online (with rollout.speculative.enable)")
    on_cpu: bool = setting(False, "also train on a CPU in-process: there the rollout already uses every core, "
                                  "so the drafter's training slows it down (runtime=ray gives it cores of its own)")
    lr: float = setting(5e-5, "AdamW learning rate (TLT: 5e-5 offline, 1e-6 online for 7B-32B targets)")
    max_steps: int = setting(200, "drafter steps per rollout at most (TLT: 200)")
    batch_size: int = setting(4, "windows per drafter step (TLT: min(batch, 4))")
    window: int = setting(512, "tokens per training window (TLT: 512)")
    keep_steps: int = setting(2, "RL steps of rollouts kept in the buffer (TLT: the last 2)")
    checkpoint_buffer_mb: float = setting(256.0, "the buffer goes into checkpoints when at most this big (0: never)")
    buffer_mb: float = setting(2048.0, "the buffer's size bound in host memory, oldest samples dropped first; a token "
                                       "takes hidden_size x dtype bytes + 9 (7 KiB for a 7B model in bf16): 2 GiB "
                                       "holds 300k such tokens (max_steps x batch_size x window = 410k are trained on)")

    def __post_init__(self) -> None:
        require(self.lr > 0, "rollout.speculative.online.lr", f"must be > 0, got {self.lr}")
        require(self.buffer_mb > 0, "rollout.speculative.online.buffer_mb",
                f"must be > 0 (MiB of host memory for the drafter's training data), got {self.buffer_mb}")
        for key in ("max_steps", "batch_size", "window", "keep_steps"):
            require(getattr(self, key) >= 1, f"rollout.speculative.online.{key}", "must be >= 1")
        require(self.checkpoint_buffer_mb >= 0, "rollout.speculative.online.checkpoint_buffer_mb",
                f"must be >= 0 (0: never save the buffer), got {self.checkpoint_buffer_mb}")


DRAFT_SOURCES = ("self", "group", "history", "eagle")


@dataclass
class LookupConfig:
    """Model-free drafts: n-gram matches in the row's own text, its group's and earlier epochs' responses."""

    min_ngram: int = setting(2, "shortest suffix of the row's text that may match (tokens)")
    max_ngram: int = setting(4, "longest suffix tried first (a longer match is a more confident draft)")
    lengths: List[int] = setting(help="draft lengths the bandit chooses among (each an arm, beside plain decoding)",
                                 default_factory=lambda: [2, 4, 8])
    tokens_per_match_token: float = setting(2.0, "a row drafts at most this many tokens per matched token "
                                                 "(SuffixDecoding's draft length from match length)")
    history_mb: float = setting(64.0, "memory bound of the history source (earlier steps' responses, by prompt)")
    history_per_prompt: int = setting(4, "responses kept per prompt in the history (the newest)")
    checkpoint_history_mb: float = setting(16.0, "the history goes into checkpoints up to this size (0: never)")
    explore_every: int = setting(40, "steps of a batch-size bucket between two tries of a non-best arm, at least")
    explore_cost: float = setting(0.005, "... and at most about this share of a bucket's time goes to arms that "
                                         "measured slower")
    min_samples: int = setting(3, "tries of every arm of a bucket before the best is exploited")
    window: int = setting(16, "rewards (tokens/s) kept per arm and bucket")

    def __post_init__(self) -> None:
        key = "rollout.speculative.lookup"
        require(1 <= self.min_ngram <= self.max_ngram, f"{key}.min_ngram",
                f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")
        require(bool(self.lengths) and all(isinstance(k, int) and k >= 1 for k in self.lengths), f"{key}.lengths",
                f"must be a non-empty list of ints >= 1, got {self.lengths!r}")
        require(self.tokens_per_match_token > 0, f"{key}.tokens_per_match_token", "must be > 0")
        require(self.history_mb >= 0 and self.checkpoint_history_mb >= 0, f"{key}.history_mb",
                "history_mb and checkpoint_history_mb must be >= 0 (0: no history / not checkpointed)")
        require(self.history_per_prompt >= 1, f"{key}.history_per_prompt", "must be >= 1")
        require(0 < self.explore_cost <= 1, f"{key}.explore_cost", f"must be in (0, 1], got {self.explore_cost}")
        for name in ("explore_every", "min_samples", "window"):
            require(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")


@dataclass
class SpeculativeConfig:
    """Lossless speculative decoding: model-free lookup drafts at any batch size, and TLT's
    EAGLE drafter on the long tail (arXiv 2511.16665)."""

    enable: Literal["auto", True, False] = setting(
        "auto", "auto: the model-free sources (self, group, history) on the native backend, off on vLLM (measured "
                "never slower; docs/speculation.md) | true: every listed source, EAGLE included, and vLLM's n-gram "
                "and EAGLE | false: off")
    sources: List[str] = setting(help="draft sources: self (the row's own text), group (the other responses to its "
                                      "prompt), history (earlier steps' responses to it), eagle (the drafter, "
                                      "on the long tail)", default_factory=lambda: list(DRAFT_SOURCES))
    lookup: LookupConfig = setting(help="the model-free sources", default_factory=LookupConfig)
    draft_vocab_size: int = setting(32768, "FR-Spec: the EAGLE drafter scores only the rollouts' most frequent "
                                           "tokens, this many (0: the whole vocabulary)")
    mode: Literal["adaptive", "always"] = setting("adaptive", "adaptive: TLT's long-tail switch, reverted where "
                                                              "measured slower; always: from the first decode step")
    threshold: int = setting(32, "switch once unfinished rows <= threshold ...")
    warmup_checks: int = setting(10, "... for this many consecutive decode steps (hysteresis)")
    probe_steps: int = setting(8, "adaptive: SD and plain steps alternate this many times after the switch; "
                                  "slower SD reverts and is probed again in a smaller batch-size bucket")
    drafter_path: Optional[str] = setting(None, "an EAGLE drafter dir for this model (python -m "
                                                "rlspec.warmup_drafter); null with the embedded default builds one")
    drafter_warmup_steps: int = setting(300, "offline warm-up steps of the embedded default's drafter")
    bandit: BanditConfig = setting(help="draft shape per batch size", default_factory=BanditConfig)
    online: OnlineDrafterConfig = setting(help="online drafter training", default_factory=OnlineDrafterConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.enable, str):
            self.enable = bool(self.enable)  # 1 / 0 from a YAML file mean true / false
        bad = [x for x in self.sources if x not in DRAFT_SOURCES]
        if bad:
            raise choice_error("rollout.speculative.sources", bad[0], DRAFT_SOURCES)
        require(len(set(self.sources)) == len(self.sources), "rollout.speculative.sources",
                f"lists a source twice: {self.sources}")
        require(self.draft_vocab_size >= 0, "rollout.speculative.draft_vocab_size", "must be >= 0 (0: whole vocabulary)")
        require(self.probe_steps >= 1, "rollout.speculative.probe_steps", f"must be >= 1, got {self.probe_steps}")
        require(self.threshold >= 1 and self.warmup_checks >= 0, "rollout.speculative.threshold",
                f"threshold must be >= 1 and warmup_checks >= 0, got {self.threshold} and {self.warmup_checks}")
        require(self.drafter_warmup_steps >= 1, "rollout.speculative.drafter_warmup_steps", "must be >= 1")


@dataclass
class VllmConfig:
    """The vLLM rollout backend: an in-process ``vllm.LLM`` that loads every new policy (no restart)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", "auto = model.dtype")
    enforce_eager: bool = setting(True, "no CUDA graphs / torch.compile: fast start, weights swap in place")
    max_model_len: Optional[int] = setting(None, "null = longest prompt + rollout.max_response_length (+ margin)")
    gpu_memory_utilization: float = setting(0.3, "GPU share for weights + KV cache (colocated with training)")
    kv_cache_gb: float = setting(1.0, "CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    enable_prefix_caching: bool = setting(True, "a GRPO group shares its prompt")
    num_speculative_tokens: int = setting(3, "draft length of vLLM's EAGLE or n-gram (self source) speculation")
    seed: int = setting(0, "vLLM's engine seed (each request is seeded from the rollout seed anyway)")
    engine_kwargs: Dict[str, Any] = setting(help="passed to vllm.LLM(...) as they are", default_factory=dict)

    def __post_init__(self) -> None:
        require(self.max_model_len is None or self.max_model_len >= 16, "rollout.vllm.max_model_len",
                "must be >= 16 or null (computed from the prompts and rollout.max_response_length)")
        require(0 < self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "must be in (0, 1]")
        require(self.kv_cache_gb > 0, "rollout.vllm.kv_cache_gb", "must be > 0")
        require(self.num_speculative_tokens >= 1, "rollout.vllm.num_speculative_tokens", "must be >= 1")


@dataclass
class RolloutConfig:
    """Sampling of training rollouts (TRL: num_generations, max_completion_length)."""

    backend: Literal["native", "vllm"] = setting("native", "native (rlspec's torch engine) | vllm")
    n: int = setting(8, "responses per prompt (the GRPO group)")
    max_response_length: int = setting(512, "cap on generated tokens; DLER's truncation length")
    temperature: float = setting(1.0, "sampling temperature")
    top_p: float = setting(1.0, "nucleus sampling")
    top_k: int = setting(0, "top-k sampling (0 = off)")
    stop_strings: List[str] = setting(help="strings that end a response", default_factory=list)
    max_batch_size: int = setting(256, "sequences decoded at once")
    length_schedule: NamedSetting = setting(help="per-step max length (SIRI siri_cosine/siri_stair/"
                                                 "siri_stair_cosine, ThinkPrune staged)", default_factory=NamedSetting)
    truncation: NamedSetting = setting(help="per-response truncation after sampling (DA-DLER difficulty_aware, "
                                            "PALU palu)", default_factory=NamedSetting)
    budget: NamedSetting = setting(help="budget-conditioned prompts (HBPO hbpo, L1 l1)", default_factory=NamedSetting)
    speculative: SpeculativeConfig = setting(help="speculative decoding", default_factory=SpeculativeConfig)
    vllm: VllmConfig = setting(help="rollout.backend=vllm", default_factory=VllmConfig)

    def __post_init__(self) -> None:
        require(self.n >= 1, "rollout.n", f"must be >= 1, got {self.n}")
        require(self.max_response_length >= 1, "rollout.max_response_length", "must be >= 1")
        require(self.temperature > 0, "rollout.temperature", "must be > 0 for RL rollouts (sampling)")
        require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, "rollout.top_k", "must be >= 0 (0 disables top-k)")
        require(self.max_batch_size >= 1, "rollout.max_batch_size", "must be >= 1")
        for key, group in (("length_schedule", "schedule"), ("truncation", "truncation"), ("budget", "budget")):
            name = getattr(self, key).name
            if name is None:
                continue
            valid = registry.LENGTH_SCHEDULES.names() if group == "schedule" else registry.ROLLOUT_HOOKS.names(group)
            if name not in valid:
                raise choice_error(f"rollout.{key}.name", name, valid)
            if group != "schedule":  # unknown kwargs keys fail here, before any model loads
                registry.ROLLOUT_HOOKS.get(name).check_kwargs(getattr(self, key).kwargs)

    def speculation(self) -> Optional[SpeculativeConfig]:
        """The speculative settings the engine runs with, or None (off): ``enable=auto`` keeps the
        model-free sources on the native backend (EAGLE needs ``enable=true``) and is off on vLLM."""
        sc = self.speculative
        if sc.enable is True:
            return sc
        if sc.enable == "auto" and self.backend == "native":
            lookups = [s for s in sc.sources if s != "eagle"]
            return dataclasses.replace(sc, sources=lookups) if lookups else None
        return None


@dataclass
class FilterGroupsConfig:
    """DAPO dynamic sampling (arXiv 2503.14476 Sec. 3.2; verl algorithm.filter_groups)."""

    enable: bool = setting(False, "drop groups whose metric is all-equal and refill the batch")
    metric: Literal["acc", "reward"] = setting("acc", "acc: raw correctness (DAPO) | reward: total reward (DLER, "
                                                      "verl seq_reward; with length-shaped rewards prefer acc)")
    max_num_gen_batches: int = setting(4, "generation chunks per step before giving up filling the batch")
    on_short: Literal["train", "error"] = setting("train", "when max_num_gen_batches chunks leave fewer than "
                                                           "prompts_per_step groups: train on those kept (warned "
                                                           "once, train/groups_short logged) | error (verl)")

    def __post_init__(self) -> None:
        require(self.max_num_gen_batches >= 1, "trainer.filter_groups.max_num_gen_batches", "must be >= 1")


@dataclass
class DeepSpeedConfig:
    """trainer.strategy=deepspeed: ZeRO data parallelism over the launched processes (gloo on CPU, NCCL on GPUs)."""

    zero_stage: Literal[0, 1, 2, 3] = setting(2, "ZeRO stage 0 | 1 | 2 | 3")
    offload_optimizer: bool = setting(False, "ZeRO-Offload of the optimizer states to CPU (GPU runs)")
    offload_param: bool = setting(False, "ZeRO-3 parameter offload to CPU (GPU runs)")
    backend: Literal["auto", "gloo", "nccl"] = setting("auto", "auto: nccl with CUDA, else gloo")
    config: Dict[str, Any] = setting(help="merged last into the generated DeepSpeed JSON (any DeepSpeed key)",
                                     default_factory=dict)

    def __post_init__(self) -> None:
        require(not self.offload_param or self.zero_stage == 3, "trainer.deepspeed.offload_param",
                "needs trainer.deepspeed.zero_stage=3")


LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class TrainerConfig:
    """Policy optimisation (GRPO and its variants). TRL names in the README's table."""

    steps: int = setting(40, "RL steps")
    prompts_per_step: int = setting(16, "prompts per step (verl train_batch_size)")
    gen_batch_size: Optional[int] = setting(None, "prompts per generation chunk with dynamic sampling; "
                                                  "null = prompts_per_step")
    mini_batch_size: Optional[int] = setting(None, "prompts per optimizer step; null = prompts_per_step (1 update)")
    micro_batch_size: int = setting(32, "responses per forward/backward (gradient accumulation)")
    micro_batch_tokens: Optional[int] = setting(4096, "padded-token budget of a micro-batch (verl dynamic bsz; "
                                                      "raise it on GPUs); null = rows only")
    ppo_epochs: int = setting(1, "passes over each rollout batch")
    lr: float = setting(5e-5, "learning rate (tuned for the embedded default; 1.5B-7B models want ~1e-6)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    betas: List[float] = setting(help="AdamW betas", default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = setting("constant", "after the warm-up")
    grad_clip: float = setting(1.0, "gradient-norm clip")
    adv_estimator: str = setting("grpo", "grpo | dr_grpo | batch_norm (DLER) | reinforce_plus_plus_baseline | "
                                         "hbpo | hbpo_code | brpo (anytime) | gae (PPO: a critic, see critic.*)")
    norm_adv_by_std: bool = setting(True, "grpo: divide by the group std")
    adv_token_weighted: bool = setting(True, "batch_norm statistics over tokens (DLER code) or responses (paper)")
    loss_agg_mode: LossAggMode = setting("token-mean", "token-mean (TRL dapo) | seq-mean-token-mean (grpo) | "
                                                       "seq-mean-token-sum | seq-mean-token-sum-norm (dr_grpo)")
    clip_ratio_low: float = setting(0.2, "PPO clip below 1 (TRL epsilon)")
    clip_ratio_high: float = setting(0.2, "PPO clip above 1 (TRL epsilon_high; clip-higher uses 0.28)")
    clip_ratio_c: Optional[float] = setting(None, "dual-clip bound for negative advantages (DLER: 10); null = off")
    kl_coef: float = setting(0.0, "KL loss weight (TRL beta); > 0 keeps a frozen reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = setting("k3", "k1 | k2 (mse) | k3 (low_var_kl)")
    kl_in_reward: bool = setting(False, "subtract kl_reward_coef x KL(policy || reference) per token from the reward "
                                        "(verl use_kl_in_reward), with trainer.kl_estimator")
    kl_reward_coef: float = setting(0.001, "trainer.kl_in_reward's weight (verl kl_ctrl.kl_coef)")
    gae: GaeConfig = setting(help="trainer.adv_estimator=gae (PPO with a critic)", default_factory=GaeConfig)
    entropy_coef: float = setting(0.0, "entropy bonus weight")
    old_logprobs: Literal["rollout", "recompute"] = setting("rollout", "rollout: the engine's log-probs | "
                                                                       "recompute: an extra forward")
    filter_groups: FilterGroupsConfig = setting(help="dynamic sampling", default_factory=FilterGroupsConfig)
    divergence: DivergenceConfig = setting(help="divergence guards", default_factory=DivergenceConfig)
    no_learning: NoLearningConfig = setting(help="silent no-learning guard", default_factory=NoLearningConfig)
    seed: int = setting(0, "seed of sampling, data order and initialisation")
    save_every: int = setting(10, "checkpoint every N steps (and at the end); 0 = only at the end")
    save_total_limit: int = setting(2, "keep the newest N step checkpoints")
    resume: str = setting("auto", "auto (latest complete checkpoint) | disable | a checkpoint dir")
    log_completions_every: int = setting(10, "write sampled completions to completions.jsonl every N steps")
    num_threads: int = setting(0, "torch threads; 0 = torch's default")
    strategy: Literal["local", "deepspeed"] = setting("local", "local: one process | deepspeed: ZeRO data parallel "
                                                               "under torchrun")
    deepspeed: DeepSpeedConfig = setting(help="trainer.strategy=deepspeed", default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        require(self.steps >= 1, "trainer.steps", f"must be >= 1, got {self.steps}")
        require(self.prompts_per_step >= 1, "trainer.prompts_per_step", "must be >= 1")
        mini = self.mini_batch_size or self.prompts_per_step
        require(self.prompts_per_step % mini == 0, "trainer.mini_batch_size",
                f"prompts_per_step={self.prompts_per_step} must be divisible by mini_batch_size={mini}; "
                f"set trainer.mini_batch_size to a divisor of {self.prompts_per_step}")
        require(self.micro_batch_size >= 1, "trainer.micro_batch_size", "must be >= 1")
        require(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, "trainer.micro_batch_tokens",
                f"must be >= 1 or null, got {self.micro_batch_tokens}")
        require(self.ppo_epochs >= 1, "trainer.ppo_epochs", "must be >= 1")
        require(self.lr > 0, "trainer.lr", f"must be > 0, got {self.lr}")
        require(len(self.betas) == 2, "trainer.betas", "must be a list of two floats, e.g. [0.9,0.999]")
        valid = (*registry.ADVANTAGE_ESTIMATORS.names(), "brpo", "gae")  # brpo: the anytime hook's; gae: the critic's
        if self.adv_estimator not in valid:
            raise choice_error("trainer.adv_estimator", self.adv_estimator, valid)
        require(0 <= self.clip_ratio_low < 1, "trainer.clip_ratio_low", "must be in [0, 1)")
        require(self.clip_ratio_high >= 0, "trainer.clip_ratio_high", "must be >= 0")
        require(self.clip_ratio_c is None or self.clip_ratio_c > 1, "trainer.clip_ratio_c",
                "dual-clip bound must be > 1 (DLER uses 10), or null to disable")
        require(self.kl_coef >= 0, "trainer.kl_coef", "must be >= 0")
        require(self.save_every >= 0, "trainer.save_every", "must be >= 0")
        require(self.save_total_limit >= 1, "trainer.save_total_limit", "must be >= 1")
        require(self.grad_clip > 0, "trainer.grad_clip", "must be > 0")


@dataclass
class RewardTermConfig:
    """One weighted reward term."""

    weight: float = setting(1.0, "weight in the sum of terms")
    kwargs: Dict[str, Any] = setting(help="the term's keyword arguments", default_factory=dict)


@dataclass
class CustomRewardConfig:
    """A user reward function (TRL- or verl-style) from a file or module."""

    path: Optional[str] = setting(None, "/path/to/file.py or a dotted module path")
    name: Optional[str] = setting(None, "function name inside it")
    weight: float = setting(1.0, "weight in the sum of terms")
    style: Literal["auto", "trl", "verl"] = setting("auto", "auto: from the function's signature")
    timeout_s: Optional[float] = setting(300.0, "seconds one call may take (TRL-style: a batch; verl: one completion)")

    def __post_init__(self) -> None:
        require(self.timeout_s is None or self.timeout_s > 0, "reward.custom.timeout_s", "must be > 0 or null")
        require((self.path is None) == (self.name is None), "reward.custom",
                "set both reward.custom.path and reward.custom.name (or neither)")


@dataclass
class RewardConfig:
    """The reward: a weighted sum of registered terms (and a custom function)."""

    terms: Dict[str, RewardTermConfig] = setting(help="name -> {weight, kwargs}: correctness, dler_truncation, "
                                                      "dapo_overlong, kimi_length, cosine, l1_exact, ...",
                                                 default_factory=dict)
    custom: CustomRewardConfig = setting(help="user reward function", default_factory=CustomRewardConfig)
    require_think_close: bool = setting(False, "grade only the text after </think>; none -> incorrect (DeepScaleR)")
    think_tags: Literal["require", "auto", "off"] = setting("require", "a model without think tags: require: stop "
                                                            "at start / step 1 | auto: warn, grade without | off: no check")
    grader_timeout_s: float = setting(5.0, "math-verify timeout per answer")
    last_number_fallback: bool = setting(False, "no \\boxed{}: grade the last number (GSM8K's flexible extract; "
                                                "models that do not box, e.g. small instruct models)")


@dataclass
class LoggerConfig:
    """Console, metrics.jsonl and Weights & Biases."""

    backends: List[Literal["console", "jsonl", "wandb"]] = setting(help="where metrics go",
                                                                   default_factory=lambda: ["console", "jsonl"])
    project: str = setting("rlspec", "wandb project")
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = setting("auto", "auto: online with an API key, "
                                                                                  "else offline")
    wandb_entity: Optional[str] = setting(None, "wandb entity")
    progress: Literal["auto", "on", "off"] = setting("auto", "progress bar (auto: on a TTY)")
    plot: bool = setting(True, "training_curves.png at the end")


@dataclass
class EvalSampling:
    """How evaluation samples: the reasoning-model standard (T=0.6, top-p 0.95), seeded.
    Shared by the trainer's held-out eval and ``python -m rlspec.eval``."""

    temperature: float = setting(0.6, "sampling temperature (0 = greedy)")
    top_p: float = setting(0.95, "nucleus sampling")
    top_k: int = setting(0, "top-k sampling (0 = off)")
    seed: int = setting(1234, "sampling seed")


@dataclass
class EvalConfig(EvalSampling):
    """Held-out evaluation during training: pass@1 averaged over samples_per_problem samples."""

    at_start: bool = setting(True, "evaluate the start model")
    at_end: bool = setting(True, "evaluate the final model")
    every: int = setting(0, "also every N steps (0 = off)")
    num_problems: Optional[int] = setting(256, "null = the whole held-out split")
    samples_per_problem: int = setting(4, "samples per problem")
    max_new_tokens: int = setting(512, "token cap per answer")

    def __post_init__(self) -> None:
        require(self.samples_per_problem >= 1, "eval.samples_per_problem", "must be >= 1")
        require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        require(self.every >= 0, "eval.every", "must be >= 0")


@dataclass
class RayConfig:
    """runtime=ray: the learner, the rollout workers and the drafter trainer as Ray actors."""

    address: Optional[str] = setting(None, "null: a local Ray instance; auto or ray://host:10001: join a cluster")
    num_rollout_workers: int = setting(2, "rollout worker actors")
    chunk_size: int = setting(8, "prompts per work item (workers pull the next one when done)")
    cpus_per_worker: float = setting(1.0, "Ray CPUs per rollout worker")
    gpus_per_worker: float = setting(0.0, "Ray GPUs per rollout worker")
    max_worker_restarts: int = setting(3, "worker deaths tolerated per rollout call")
    namespace: str = setting("rlspec", "Ray namespace of the actors")
    learner_cpus: float = setting(1.0, "Ray CPUs of the learner actor")
    learner_gpus: float = setting(0.0, "Ray GPUs of the learner actor")
    drafter_trainer_cpus: float = setting(1.0, "Ray CPUs of the drafter trainer actor")
    drafter_trainer_gpus: float = setting(0.0, "Ray GPUs of the drafter trainer actor")

    def __post_init__(self) -> None:
        require(self.num_rollout_workers >= 1, "ray.num_rollout_workers", "must be >= 1")
        require(self.chunk_size >= 1, "ray.chunk_size", "must be >= 1")
        require(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
        require(self.gpus_per_worker >= 0, "ray.gpus_per_worker", "must be >= 0")
        require(self.max_worker_restarts >= 0, "ray.max_worker_restarts", "must be >= 0")
        for key in ("learner_cpus", "learner_gpus", "drafter_trainer_cpus", "drafter_trainer_gpus"):
            require(getattr(self, key) >= 0, f"ray.{key}", "must be >= 0")


@dataclass
class RLSpecConfig:
    """The whole training config."""

    run_name: str = setting("default", "name of the run (a recipe sets it)")
    run_dir: str = setting("runs/default", "run directory (default runs/<run_name>); re-running resumes it")
    model: ModelConfig = setting(help="the policy", default_factory=ModelConfig)
    data: DataConfig = setting(help="prompts", default_factory=DataConfig)
    rollout: RolloutConfig = setting(help="sampling", default_factory=RolloutConfig)
    trainer: TrainerConfig = setting(help="optimisation", default_factory=TrainerConfig)
    reward: RewardConfig = setting(help="reward", default_factory=RewardConfig)
    logger: LoggerConfig = setting(help="logging", default_factory=LoggerConfig)
    eval: EvalConfig = setting(help="held-out evaluation", default_factory=EvalConfig)
    critic: CriticConfig = setting(help="trainer.adv_estimator=gae: the value model", default_factory=CriticConfig)
    hbpo: HbpoConfig = setting(help="HBPO constants", default_factory=HbpoConfig)
    anytime: AnytimeConfig = setting(help="AnytimeReasoner", default_factory=AnytimeConfig)
    runtime: Literal["local", "ray"] = setting("local", "local: this process (one per rank under torchrun) | "
                                                        "ray: Ray actors")
    ray: RayConfig = setting(help="runtime=ray", default_factory=RayConfig)
    recipe_notes: str = setting("", "what a recipe reproduces (free text)")

    def __post_init__(self) -> None:
        require(bool(self.reward.terms) or self.reward.custom.path is not None, "reward.terms",
                "no reward term is configured; choose reward=correctness or set reward.custom.path")
        check_group_size(self)  # rollout.n >= 2 for the group estimators and dynamic sampling
        if self.anytime.enable != (self.trainer.adv_estimator == "brpo"):
            raise ConfigError(
                "anytime.enable=true needs trainer.adv_estimator=brpo and the reverse (BRPO advantages come from "
                "the budget-truncated summaries); use +recipe=anytime"
            )
        if self.trainer.adv_estimator in ("hbpo", "hbpo_code") and self.rollout.budget.name != "hbpo":
            raise ConfigError(f"trainer.adv_estimator={self.trainer.adv_estimator} needs rollout.budget.name=hbpo "
                              f"(the budget subgroups it normalises over); recipe=hbpo sets both")
        if "hbpo" in self.reward.terms and self.reward.terms["hbpo"].kwargs:
            raise ConfigError("set HBPO's constants in the `hbpo` section (hbpo.variant, hbpo.l_max, hbpo.beta, "
                              "hbpo.alpha), not in reward.terms.hbpo.kwargs: the prefill and advantage use them too")
        if self.anytime.enable:
            budgets = self.anytime.budgets or []
            require(not budgets or budgets[-1] <= self.rollout.max_response_length, "anytime.budgets",
                    f"the last budget ({budgets[-1] if budgets else 0}) must be <= rollout.max_response_length="
                    f"{self.rollout.max_response_length}")
            others = [k for k, on in (("rollout.truncation.name", self.rollout.truncation.name),
                                      ("rollout.budget.name", self.rollout.budget.name),
                                      ("reward.custom.path", self.reward.custom.path),
                                      ("rollout.length_schedule.name", self.rollout.length_schedule.name))
                      if on]
            others += [f"reward.terms.{t}" for t in self.reward.terms if t != "correctness"]
            require(not others, "anytime.enable", f"scores summaries by correctness only (paper Sec. 3); "
                    f"unset {', '.join(others)}")


def defaults() -> dict[str, Any]:
    """The schema's defaults as nested plain dicts (each section's; the whole config is checked
    only once a reward is chosen)."""
    return field_defaults(RLSpecConfig)


def validate_config(cfg: DictConfig | dict[str, Any]) -> RLSpecConfig:
    """Build the typed config from a composed Hydra config (raises ConfigError on the first bad key).

    The composed YAML holds only what the groups and recipe set; the schema defaults are merged
    under it first, so an interpolation such as ``${rollout.max_response_length}`` resolves even
    when no YAML sets that key.
    """
    try:
        base = OmegaConf.create(defaults())
        merged = OmegaConf.merge(base, cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))
        container = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config error: {str(err).splitlines()[0]}") from None
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return build(RLSpecConfig, container)
