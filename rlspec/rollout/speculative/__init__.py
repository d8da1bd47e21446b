"""Lossless speculative decoding of the rollout's long tail (TLT, arXiv 2511.16665), in layers.

==========================  ==========================================================================
module                      what it holds
==========================  ==========================================================================
``draft_tree``              draft shapes (``ArmShape``) and EAGLE-2's tree construction (pure tensors)
``verification``            lossless verification of chains and trees (pure tensors)
``bandit``                  EAGLE's draft shape per batch-size bucket (TLT's BEG-MAB)
``selector``                plain or a lookup draft of some length, per batch size, by measured tokens/s
``sources``                 the draft-source interface: where drafts come from
``lookup``                  the incremental n-gram index and its voted continuation (pure Python)
``lookup_source``           model-free drafts: the row's own text, its group's, earlier steps' responses
``history``                 earlier steps' responses by prompt, in a bounded memory (+ checkpoint part)
``eagle``                   the EAGLE drafter model (one decoder layer on the target's features)
``eagle_source``            drafts from the EAGLE drafter, as a draft source
``decoder``                 one draft -> verify -> commit step on the target's KV cache
``controller``              when to speculate: the long-tail switch, probe, revert and back-off
``drafter_buffer``          the drafter's training data (rollouts' hidden states by RL step)
``drafter_training``        the EAGLE shift, TLT's loss, the preemptible drafter trainer
``warmup``                  offline warm-up on the target's own generations
``spot_trainer``            TLT's spot trainer: drafter training during the long tail, in a thread
``remote_spot_trainer``     the same in a Ray actor (``runtime=ray``)
``online``                  the spot trainer wired to training rollouts; the drafter's checkpoint part
==========================  ==========================================================================

The native engine (:mod:`rlspec.rollout.native`) drives ``selector``, ``controller`` and ``decoder``; the output
distribution, log-probs and hidden states are the target's whatever the drafts.
"""
