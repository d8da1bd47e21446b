"""The native torch rollout engine: batched sampling with a KV cache and continuous batching.

:class:`NativeEngine` is the **scheduler**: it keeps a queue of waiting prompts and a batch of
active rows, admits waiting prompts into free slots (continuous batching), samples one token per
active row per decode step (:mod:`rlspec.rollout.sampling`), checks EOS / stop strings /
``max_new_tokens`` and removes finished rows, so compute shrinks as the batch drains. A
**backend** owns the model forward and the KV cache of the active rows: the fast path for
Llama-family models (:class:`~rlspec.rollout.fast_backend.LlamaFastBackend`) or any HF causal LM
(:class:`~rlspec.rollout.backends.HFGenericBackend`).

With speculative settings and a drafter, the long tail of a call is decoded speculatively
(:mod:`rlspec.rollout.speculative`): the :class:`~rlspec.rollout.speculative.controller.LongTailController`
decides when, a :class:`~rlspec.rollout.speculative.decoder.SpeculativeDecoder` runs the draft /
verify steps. ``generate(..., return_hidden_states=True)`` returns the last-layer
(post-final-norm) hidden states that produced each generated token -- the features an EAGLE
drafter is trained on.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from rlspec.config import SpeculativeConfig
from rlspec.errors import ConfigError
from rlspec.rollout.backends import Backend, HFGenericBackend
from rlspec.rollout.base import FINISH_LENGTH, FINISH_STOP, FinishedSample, RolloutResult, RolloutResultWithHidden
from rlspec.rollout.base import SamplingParams
from rlspec.rollout.base import check_prompt_ids, stream_keys
from rlspec.rollout.fast_backend import LlamaFastBackend, UnsupportedModel
from rlspec.rollout.sampling import position_uniforms, sample_next_tokens
from rlspec.rollout.speculative.bandit import DraftShapeBandit
from rlspec.rollout.speculative.controller import LongTailController
from rlspec.rollout.speculative.decoder import SpecStats, SpeculativeDecoder
from rlspec.rollout.speculative.draft_tree import ArmShape
from rlspec.rollout.speculative.drafter_buffer import host_sync, to_host
from rlspec.rollout.speculative.eagle_source import EagleDraftSource
from rlspec.rollout.speculative.history import DraftHistory
from rlspec.rollout.speculative.lookup_source import LOOKUP_SOURCES, LookupDraftSource
from rlspec.rollout.speculative.selector import PLAIN, StepSelector


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class NativeEngine:
    """Batched KV-cache sampling in plain torch, with continuous batching.

    Args:
        model: an HF causal LM (``AutoModelForCausalLM``), on the device to generate on.
        eos_token_ids: ids that end a response (e.g. ``<|im_end|>``); the EOS token is kept in
            the response and gets a logprob.
        tokenizer: needed only for ``SamplingParams.stop_strings`` (its ``decode`` is used).
        max_batch_size: most sequences decoded at once; more prompts wait for free slots.
        pad_token_id: filler id for padded prompt positions (masked out; any valid id works).
            Default: the model config's pad id, else the first EOS id, else 0.
        fast_path: ``None`` picks the Llama-family fast path when the model supports it,
            ``True`` requires it (ConfigError otherwise), ``False`` always uses the HF forward.
        fuse_weights: fast path only: keep fused q/k/v and gate/up weight copies (fewer, larger
            matmuls: a few % faster on small models; extra memory of about the attention + MLP
            weights). They are rebuilt by :meth:`update_weights`, and by ``generate`` when it sees
            that parameters changed (version counters); ``False`` reads every weight in place.
        prefill_tokens: padded-token budget of one prefill forward (prompts are admitted in
            chunks of at most this many tokens; at least one prompt per chunk).
        speculative: optional ``rollout.speculative`` settings
            (:class:`~rlspec.config.SpeculativeConfig`); with a drafter (:meth:`set_drafter`) the
            fast path switches to lossless speculative decoding on the long tail
            (:mod:`rlspec.rollout.speculative`). The output distribution, the returned log-probs
            and hidden states are the target's either way.

    Results do not depend on how ``max_batch_size`` splits the prompts beyond floating-point
    rounding; with a ``SamplingParams.seed`` a row's tokens depend on its prompt and stream key
    (``SamplingParams.streams``, default the request index) only, not on the rows beside it.
    """

    def __init__(
        self,
        model,
        eos_token_ids: Sequence[int],
        tokenizer=None,
        max_batch_size: int = 256,
        pad_token_id: int | None = None,
        *,
        fast_path: bool | None = None,
        fuse_weights: bool = True,
        prefill_tokens: int = 8192,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"rollout max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_tokens < 1:
            raise ConfigError(f"rollout prefill_tokens must be >= 1, got {prefill_tokens}")
        self.model = model
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self._eos = frozenset(self.eos_token_ids)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        cfg_pad = getattr(model.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = cfg_pad if cfg_pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"rollout pad_token_id={self.pad_token_id} is outside the model's vocabulary "
                f"[0, {self.vocab_size}): pass pad_token_id= a valid id (e.g. the tokenizer's pad id)"
            )
        self.device = next(model.parameters()).device
        self.generic = HFGenericBackend(model, self.pad_token_id)
        self.fast: LlamaFastBackend | None = None
        self.fast_unsupported: str | None = None
        if fast_path is not False:
            try:
                self.fast = LlamaFastBackend(model, self.pad_token_id, fuse_weights=fuse_weights)
            except UnsupportedModel as err:
                self.fast_unsupported = str(err)
                if fast_path:
                    raise ConfigError(
                        f"rollout fast_path=True but the fast path cannot run this model: {err}. "
                        "Set fast_path to null/None (auto) or False."
                    ) from None
        self.last_backend: str | None = None  # "fast" or "generic": which path the last call used
        self.speculative = speculative
        self.drafter = None
        self.bandit: DraftShapeBandit | None = None  # draft shape per batch size; learns across calls
        self.tail: LongTailController | None = None  # when to speculate; its back-off spans calls
        # called once per generate() when the long tail starts, with the finished requests'
        # (prompt, response, hidden states) when hidden states are collected: TLT's spot trainer
        # starts there
        self.on_long_tail: Callable[[list[FinishedSample]], None] | None = None
        self.lookup_sources: tuple[str, ...] = ()
        self.selector: StepSelector | None = None  # plain vs lookup drafts per batch size; learns across calls
        self.history: DraftHistory | None = None  # earlier calls' responses by prompt (the history source)
        self.token_counts = torch.zeros(self.vocab_size, dtype=torch.long)  # generated tokens (FR-Spec's ranking)
        if speculative is not None:
            self.bandit = DraftShapeBandit(speculative.bandit, device_type=self.device.type)
            self.tail = LongTailController(speculative, self.bandit.bucket_of)
            look = speculative.lookup
            self.lookup_sources = tuple(s for s in speculative.sources if s in LOOKUP_SOURCES)
            if self.lookup_sources:
                self.selector = StepSelector.for_lookups(look, speculative.mode)
            if "history" in self.lookup_sources and look.history_mb > 0:
                self.history = DraftHistory(int(look.history_mb * 2**20), look.history_per_prompt,
                                            context=look.max_ngram)

    def set_drafter(self, drafter) -> None:
        """Use ``drafter`` (an :class:`~rlspec.rollout.speculative.eagle.EagleDrafter` of this model)
        for speculative decoding of the long tail from the next ``generate`` call on (``None`` turns
        it off; so does a ``rollout.speculative.sources`` list without ``eagle``)."""
        self.drafter = drafter

    def draft_vocab(self) -> torch.Tensor | None:
        """FR-Spec's draft vocabulary: the ``draft_vocab_size`` most frequent generated tokens so far
        (EOS always in), ascending ids; None for the whole vocabulary (nothing generated yet, or the
        vocabulary is no larger)."""
        k = self.speculative.draft_vocab_size if self.speculative is not None else 0
        if not k or k >= self.vocab_size or not int(self.token_counts.sum()):
            return None
        counts = self.token_counts.clone()
        counts[self.eos_token_ids] = counts.max() + 1
        return torch.sort(torch.topk(counts, k).indices).values

    # -- RolloutEngine ----------------------------------------------------------------------

    def update_weights(self) -> None:
        """Refresh what the fast path derived from the parameters (fused weights, references)."""
        if self.fast is not None:
            self.fast.refresh()

    def free_cache(self) -> None:
        """Release the preallocated KV cache (it is kept between calls otherwise)."""
        if self.fast is not None:
            self.fast.free_cache()

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, return_hidden_states: bool = False
    ) -> RolloutResult:
        """Sample one response per prompt; see :class:`~rlspec.rollout.base.RolloutResult`.

        With ``return_hidden_states=True`` the result is a :class:`RolloutResultWithHidden`.
        """
        prompts = check_prompt_ids(prompt_ids, self.vocab_size)
        if self.fast is not None and self.fast.is_stale():  # a safety net; update_weights is the contract
            self.fast.refresh()
        if params.stop_strings and self.tokenizer is None:
            raise ConfigError(
                "stop_strings need a tokenizer: pass tokenizer=... to NativeEngine (or drop stop_strings)"
            )
        max_len = (max(len(p) for p in prompts) if prompts else 0) + params.max_new_tokens
        backend: Backend = self.generic
        if self.fast is not None and self.fast.supports_length(max_len):
            backend = self.fast
        self.last_backend = backend.name
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        start = time.perf_counter()
        call = _GenerateCall(self, backend, prompts, params, generator, return_hidden_states)
        if prompts:
            mode = _eval_mode(self.model) if backend is self.generic else contextlib.nullcontext()
            with torch.inference_mode(), mode:
                call.run()
        seconds = time.perf_counter() - start
        tokens = sum(len(r) for r in call.responses)
        stats = {
            "tokens": float(tokens),
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "prompt_tokens": float(sum(len(p) for p in prompts)),
            "decode_steps": float(call.steps),
        }
        if call.tail_start is not None:  # the long-tail phase (speculative settings only): from the switch point on
            stats["tail_seconds"] = start + seconds - call.tail_start
            stats["tail_tokens"] = float(tokens - call.tail_tokens_before)
        if call.stats is not None:
            stats.update(call.stats.as_stats())
            if seconds > 0:  # shares of the call's wall time
                stats["spec/draft_share"] = call.stats.draft_seconds / seconds
                stats["spec/verify_share"] = call.stats.verify_seconds / seconds
        if self.speculative is not None and "eagle" in self.speculative.sources and tokens:  # FR-Spec's counts
            generated = np.fromiter(itertools.chain.from_iterable(call.responses), dtype=np.int64, count=tokens)
            self.token_counts += torch.bincount(torch.from_numpy(generated), minlength=self.vocab_size)
        if self.history is not None:
            for prompt, response in zip(prompts, call.responses):
                self.history.add(prompt, response)
            stats["spec/history_bytes"] = float(self.history.nbytes)
            stats["spec/history_prompts"] = float(len(self.history))
        result_kw = dict(
            prompt_ids=prompts,
            response_ids=call.responses,
            response_logprobs=[torch.tensor(lp, dtype=torch.float32) for lp in call.logprobs],
            finish_reasons=call.finish,
            stats=stats,
        )
        if not return_hidden_states:
            return RolloutResult(**result_kw)
        return RolloutResultWithHidden(**result_kw, response_hidden_states=call.collect_hidden())


class _GenerateCall:
    """One ``generate`` call: the scheduler loop over admission, plain and speculative steps."""

    def __init__(self, engine: NativeEngine, backend: Backend, prompts: list[list[int]], params: SamplingParams,
                 generator: torch.Generator | None, want_hidden: bool) -> None:
        self.engine, self.backend, self.prompts, self.params = engine, backend, prompts, params
        self.generator, self.want_hidden = generator, want_hidden
        # sampled tokens draw position-keyed numbers (request's stream key, token index) when the
        # call is seeded: the same tokens whichever rows share a step or a call, and lookup drafts
        # verified coupled with plain sampling emit exactly them (speculation on or off, same run)
        self.seed = params.seed if params.seed is not None and not params.greedy else None
        n = len(prompts)
        self.streams = torch.tensor(stream_keys(params, n), dtype=torch.long)  # per request
        self.responses: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.finish: list[str] = [FINISH_LENGTH] * n
        # per prefill/decode step: (hidden states [m, H], the request of each row)
        self.hidden_steps: list[tuple[torch.Tensor, list[int]]] = []
        self.prompt_states: dict[int, torch.Tensor] = {}  # request -> [P, H] (keep_states only)
        self.steps = 0
        self.total_tokens = 0  # tokens appended so far (all requests)
        self.tail_start: float | None = None
        self.tail_tokens_before = 0
        self.rows: list[int] = []  # request index of each active row
        self.cur = torch.zeros(0, dtype=torch.long, device=engine.device)  # last token of each row
        self.stops = tuple(params.stop_strings)
        # a stop string of b UTF-8 bytes completed by the newest token spans at most b tokens when
        # every token decodes to >= 1 byte; a few more absorb a multi-byte char cut at the start
        self.stop_window = max(len(s.encode("utf-8")) for s in self.stops) + 4 if self.stops else 0
        self.decode_text = engine.tokenizer.decode if self.stops else None
        self.decoder: SpeculativeDecoder | None = None  # None: no drafter, generic path, or reverted
        self.reverted: SpeculativeDecoder | None = None  # the decoder a revert turned off (re-entry)
        self.stats: SpecStats | None = None
        self.in_sd = False
        self.keep_states, self.track_states = False, want_hidden
        max_len = max((len(p) for p in prompts), default=0) + params.max_new_tokens
        self.lookup: LookupDraftSource | None = None  # model-free drafts, at any batch size
        self.lookup_decoder: SpeculativeDecoder | None = None
        if engine.selector is not None and backend is engine.fast:
            self.lookup = LookupDraftSource(prompts, self.responses, lambda: self.rows, engine.lookup_sources,
                                            engine.speculative.lookup, engine.history, engine.device)
            self.lookup_decoder = SpeculativeDecoder(backend, self.lookup, params, engine.bandit, generator,
                                                     uniforms=self.row_uniforms if self.seed is not None else None)
            self.stats = SpecStats()
            max_len += max(engine.speculative.lookup.lengths) + 2
        if (engine.speculative is not None and engine.drafter is not None and backend is engine.fast
                and "eagle" in engine.speculative.sources):
            source = EagleDraftSource(engine.drafter, engine.device, engine.draft_vocab())
            self.decoder = SpeculativeDecoder(backend, source, params, engine.bandit, generator)
            # the drafter's state at the switch needs h_0 .. h_{L-1} of every tail row: keep what the
            # rollout computes anyway (prompt states from the prefill, one state per decode step) when
            # the states are collected for the caller, or on CPU, where re-running the tail rows'
            # prefixes (TLT's way) costs more than the tail saves; otherwise the switch re-runs them
            self.keep_states = want_hidden or engine.device.type == "cpu"
            # after a revert the adaptive engine tries SD again once the batch has shrunk into a
            # smaller bucket; with kept states that needs every row's states for the whole call
            self.track_states = want_hidden or (self.keep_states and engine.speculative.mode == "adaptive")
            max_len += SpeculativeDecoder.cache_slack(engine.bandit)  # draft-tree columns past a row's length
            self.stats = self.stats or SpecStats()
        self.num_slots = min(engine.max_batch_size, len(prompts))
        self.max_len = max_len

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        tail = self.engine.tail
        if tail is not None:
            tail.begin_call()
        self.backend.begin(self.num_slots, self.max_len)
        self.waiting = deque(range(len(self.prompts)))
        try:
            while True:
                self.admit()
                if not self.rows:
                    if self.waiting:
                        continue
                    break
                if tail is not None and not tail.in_tail:
                    if tail.reached_tail(len(self.rows), bool(self.waiting)):
                        self.enter_tail()
                elif self.reverted is not None and tail.may_reenter(len(self.rows)):
                    self.decoder, self.reverted = self.reverted, None
                    self.switch_on()
                    self.stats.reentered += 1
                self.steps += 1
                if self.in_sd and tail.wants_plain_step():
                    self.probe_plain_step()
                elif self.in_sd:
                    self.speculative_step(self.decoder, record=tail.probing)
                elif self.lookup is not None:
                    self.selected_step()
                else:
                    self.plain_step()
        finally:
            self.backend.end()

    def admit(self) -> None:
        """Prefill waiting prompts into free slots (chunks of at most ``prefill_tokens`` padded tokens)."""
        engine, backend = self.engine, self.backend
        in_tail = engine.tail is not None and engine.tail.in_tail
        while self.waiting and len(self.rows) < self.num_slots and backend.can_admit(len(self.rows)):
            chunk = self._next_chunk(self.num_slots - len(self.rows))
            if self.keep_states and not in_tail:
                logits, hidden, states = backend.prefill_keeping_states(
                    [self.prompts[r] for r in chunk], True, keep_states=True)
                for j, r in enumerate(chunk):
                    self.prompt_states[r] = to_host(states[j, : len(self.prompts[r])], non_blocking=True)
            else:
                logits, hidden = backend.prefill([self.prompts[r] for r in chunk], self.want_hidden)
            tokens, done = self.consume(logits, hidden, chunk)
            offset = len(self.rows)
            self.rows.extend(chunk)
            self.cur = torch.cat([self.cur, tokens])
            if done:
                self.remove([offset + i for i in done])

    def _next_chunk(self, free: int) -> list[int]:
        chunk: list[int] = []
        longest = 0
        while self.waiting and len(chunk) < free:
            nxt = len(self.prompts[self.waiting[0]])
            if chunk and max(longest, nxt) * (len(chunk) + 1) > self.engine.prefill_tokens:
                break
            longest = max(longest, nxt)
            chunk.append(self.waiting.popleft())
        return chunk

    def enter_tail(self) -> None:
        """The long tail starts: tell the listener, then speculate unless the bucket is backed off."""
        engine = self.engine
        self.tail_start = time.perf_counter()
        self.tail_tokens_before = sum(len(r) for r in self.responses)
        if engine.on_long_tail is not None:
            active = set(self.rows)
            done_reqs = [r for r in range(len(self.prompts)) if self.responses[r] and r not in active
                         and r not in self.waiting]
            engine.on_long_tail(self.finished_samples(done_reqs) if self.want_hidden else [])
        if self.decoder is None:
            return  # no drafter for this call
        if engine.tail.may_speculate():
            self.switch_on()
        else:  # ... but a smaller bucket may still try it
            self.decoder, self.reverted = None, self.decoder

    def switch_on(self) -> None:
        """Start the decoder for the active rows (from the kept states, else the target re-runs
        their prefixes)."""
        t_switch = time.perf_counter()
        known = self.prefix_states() if self.keep_states else None
        self.decoder.start([self.prompts[r] + self.responses[r] for r in self.rows], known)
        if not self.track_states:  # kept for the switch only
            self.hidden_steps.clear()
            self.prompt_states.clear()
        self.stats.switch_seconds += time.perf_counter() - t_switch
        self.in_sd = True

    # ------------------------------------------------------------------ steps
    def selected_step(self) -> None:
        """Plain or a lookup draft of some length, as the engine's selector says for this many rows;
        the step's tokens and time go back to the selector (scored against a plain step there)."""
        selector, n_rows = self.engine.selector, len(self.rows)
        arm = selector.select(n_rows)
        kv = max(self.backend.lens) + 1  # the columns a plain step attends over
        t0 = time.perf_counter()
        before = self.total_tokens
        critical = None
        if arm == PLAIN:
            self.plain_step()
        else:
            rows = [] if self.waiting else list(self.rows)  # no prompt waits: the least-advanced row's gain counts
            made = [len(self.responses[r]) for r in rows]
            k = int(arm.split("/")[1])
            lens = torch.tensor(self.backend.lens, dtype=torch.long, device=self.engine.device)
            draft = self.lookup.propose(ArmShape(k, 1, k), lens, self.params, self.generator)
            self.stats.draft_seconds += time.perf_counter() - t0
            if draft is None:  # no row found a match: a plain step (the lookup's cost is the arm's)
                self.plain_step()
            else:
                self.speculative_step(self.lookup_decoder, record=False, arm=ArmShape(k, 1, k), draft=draft,
                                      row_sources=self.lookup.last_sources)
            if rows:
                low = min(made)
                critical = min(len(self.responses[r]) - n for r, n in zip(rows, made) if n == low)
        selector.record(n_rows, arm, self.total_tokens - before, time.perf_counter() - t0, kv, critical)

    def plain_step(self) -> None:
        t_plain = time.perf_counter()
        n_rows = len(self.rows)
        in_tail = self.engine.tail is not None and self.engine.tail.in_tail
        logits, hidden = self.backend.decode(self.cur, self.track_states or (self.keep_states and not in_tail))
        self.cur, done = self.consume(logits, hidden, self.rows)
        if self.stats is not None:
            self._count_plain(n_rows, time.perf_counter() - t_plain)
        if done:
            self.remove(done)

    def probe_plain_step(self) -> None:
        """The plain half of the adaptive probe: a plain step timed at the same batch size."""
        t_plain = time.perf_counter()
        n_rows = len(self.rows)
        logits, hidden = self.backend.decode(self.cur, True)
        self.cur, done = self.consume(logits, hidden if self.track_states else None, self.rows)
        self.decoder.observe_plain_step(self.cur, hidden)
        elapsed = time.perf_counter() - t_plain
        self._count_plain(n_rows, elapsed)
        verdict = self.engine.tail.record_plain(n_rows / max(elapsed, 1e-9))
        if verdict is False:  # "never slower than plain": back to plain decoding for this call
            self.stats.reverted = 1
            self.in_sd = False
            self.decoder.abandon()
            self.decoder, self.reverted = None, self.decoder
        elif verdict and self.track_states and not self.want_hidden:  # no revert, so no re-entry, from here
            self.track_states = False
            self.hidden_steps.clear()
            self.prompt_states.clear()
        if done:
            self.remove(done)

    def speculative_step(self, decoder: SpeculativeDecoder, record: bool, **step_kw) -> None:
        t_sd = time.perf_counter()
        before = self.total_tokens
        in_tail = self.engine.tail.in_tail
        want_states = self.track_states or (self.keep_states and not in_tail)  # as a plain step keeps them
        outs = decoder.step(self.cur, self.stats, **step_kw)
        done, kept, new_cur, kept_hidden, kept_reqs = [], [], [], [], []
        for i, (r, (emitted, lps, hid, _last)) in enumerate(zip(self.rows, outs)):
            k, finished = 0, False
            for t, lp in zip(emitted, lps):
                k += 1
                if self.append(r, t, lp):
                    finished = True
                    break
            kept.append(k)
            new_cur.append(emitted[-1])
            if want_states:
                kept_hidden.append(hid[:k])
                kept_reqs += [r] * k
            if finished:
                done.append(i)
        if want_states and kept_hidden:
            self.hidden_steps.append((to_host(torch.cat(kept_hidden), non_blocking=True), kept_reqs))
        decoder.commit(kept)
        self.cur = torch.tensor(new_cur, dtype=torch.long, device=self.engine.device)
        if record:
            self.engine.tail.record_speculative((self.total_tokens - before) / max(time.perf_counter() - t_sd, 1e-9))
        if done:
            self.remove(done)

    def _count_plain(self, n_rows: int, elapsed: float) -> None:
        self.stats.plain_steps += 1
        self.stats.plain_tokens += n_rows
        self.stats.plain_seconds += elapsed

    # ------------------------------------------------------------------ rows
    def append(self, r: int, t: int, lp: float) -> bool:
        """Append token ``t`` to request ``r``; True when the request is finished."""
        resp = self.responses[r]
        resp.append(t)
        self.total_tokens += 1
        self.logprobs[r].append(lp)
        if t in self.engine._eos or (self.stops and any(
                s in self.decode_text(resp[-self.stop_window:], skip_special_tokens=False) for s in self.stops)):
            self.finish[r] = FINISH_STOP
            return True
        return len(resp) >= self.params.max_new_tokens  # FINISH_LENGTH (the default)

    def consume(self, logits: torch.Tensor, hidden: torch.Tensor | None, reqs: list[int]) -> tuple[torch.Tensor, list]:
        """Sample one token per row from ``logits``; returns the tokens and the finished rows."""
        uniform = self._uniforms(reqs, 1)[:, 0] if self.seed is not None else None
        tokens, lps = sample_next_tokens(logits, self.params, self.generator, uniform)
        if hidden is not None:
            self.hidden_steps.append((to_host(hidden, non_blocking=True), list(reqs)))  # off the GPU as collected
        host = torch.stack((tokens.to(torch.float64), lps.to(torch.float64))).tolist()
        done = [i for i, (r, t, lp) in enumerate(zip(reqs, host[0], host[1])) if self.append(r, int(t), lp)]
        return tokens, done

    def row_uniforms(self, width: int) -> torch.Tensor:
        """``[rows, width]`` position-keyed numbers of the active rows' next ``width`` tokens."""
        return self._uniforms(self.rows, width)

    def _uniforms(self, reqs: list[int], width: int) -> torch.Tensor:
        """``[len(reqs), width]`` position-keyed numbers of requests ``reqs``' next ``width`` tokens."""
        first = torch.tensor([len(self.responses[r]) for r in reqs], dtype=torch.long)
        streams = self.streams[torch.tensor(reqs, dtype=torch.long)]
        return position_uniforms(self.seed, streams, first[:, None] + torch.arange(width)).to(self.engine.device)

    def remove(self, done: list[int]) -> None:
        """Drop finished rows from the backend (and the decoder while speculating)."""
        order = self.backend.remove(done)
        if self.in_sd:
            self.decoder.remove(done, order)
        self.rows = [self.rows[i] for i in order]
        self.cur = self.cur[torch.tensor(order, dtype=torch.long, device=self.cur.device)]

    # ------------------------------------------------------------------ hidden states
    def prefix_states(self) -> list[torch.Tensor]:
        """Per active row, the target's hidden states ``h_0 .. h_{L-1}`` of the tokens in its cache,
        from the prefill's prompt states and the per-step states collected before the switch.

        ``hidden_steps`` holds, per prefill/decode call, ``(states [m, H], requests)``: a row's first
        entry is its prefill's ``h_{P-1}`` (already the last prompt state), then one ``h_j`` per
        decode step that fed ``x_j``, ``j = P .. L-1``. They are kept in host memory (copied out as
        they are computed); the active rows' go back to the engine's device here.
        """
        host_sync(self.engine.device)
        active = set(self.rows)
        per_row: dict[int, list[torch.Tensor]] = {r: [] for r in self.rows}
        for states, reqs in self.hidden_steps:
            for i, r in enumerate(reqs):
                if r in active:
                    per_row[r].append(states[i])
        out = []
        for r in self.rows:
            decoded = per_row[r][1:]  # drop the prefill's h_{P-1}
            prompt = self.prompt_states[r]
            out.append((torch.cat([prompt, torch.stack(decoded)]) if decoded else prompt).to(self.engine.device))
        return out

    def finished_samples(self, reqs: list[int]) -> list[FinishedSample]:
        """``(prompt, response, hidden [len, H])`` of finished requests ``reqs`` mid-generation."""
        if not reqs or not self.hidden_steps:
            return []
        host_sync(self.engine.device)
        wanted = set(reqs)
        parts: dict[int, list[torch.Tensor]] = {r: [] for r in reqs}
        for h, owners in self.hidden_steps:
            for i in [i for i, r in enumerate(owners) if r in wanted]:
                parts[owners[i]].append(h[i])
        return [(list(self.prompts[r]), list(self.responses[r]), torch.stack(parts[r]).clone()) for r in reqs
                if len(parts[r]) == len(self.responses[r])]

    def collect_hidden(self) -> list[torch.Tensor]:
        if not self.hidden_steps:
            return [torch.zeros(0) for _ in self.responses]
        host_sync(self.engine.device)
        states = torch.cat([h for h, _ in self.hidden_steps]).clone()  # clone: a normal (not inference) tensor
        owner = torch.tensor([r for _, reqs in self.hidden_steps for r in reqs], dtype=torch.long)
        order = torch.sort(owner, stable=True).indices  # chronological within each request
        states = states[order.to(states.device)]
        return list(torch.split(states, [len(r) for r in self.responses]))
