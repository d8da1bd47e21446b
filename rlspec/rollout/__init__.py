"""Rollout engines: sample responses (token ids + policy log-probs) for the trainer.

* :mod:`rlspec.rollout.base` -- the interface the trainer talks to (``generate`` / ``update_weights``);
* :mod:`rlspec.rollout.native` -- rlspec's torch engine (continuous batching, KV cache), with the
  fast path of :mod:`~rlspec.rollout.fast_backend` and the generic one of :mod:`~rlspec.rollout.backends`;
* :mod:`rlspec.rollout.speculative` -- lossless speculative decoding of the long tail (TLT);
* :mod:`rlspec.rollout.vllm_engine`, :mod:`rlspec.rollout.ray_engine` -- vLLM and a Ray worker pool;
* :mod:`rlspec.rollout.engines` -- :func:`~rlspec.rollout.engines.make_engine` by ``rollout.backend``.
"""
