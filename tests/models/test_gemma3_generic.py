"""Gemma 3 (issue 19.3's base model) has no fast path: the native engine runs it through the generic
HF backend, whose cache here mixes sliding-window and full-attention layers. Greedy decoding must
equal the model's own ``generate``, prompt by prompt, also when rows join a running batch."""

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from rlspec.rollout.base import SamplingParams
from rlspec.rollout.native import NativeEngine

V = 128


def test_gemma3_runs_on_the_generic_backend_like_generate():
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                              pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 11, 3)]
    engine = NativeEngine(model, eos_token_ids=[], max_batch_size=2)
    assert engine.fast is None and "Gemma3ForCausalLM" in engine.fast_unsupported
    res = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert engine.last_backend == "generic"
    for prompt, response in zip(prompts, res.response_ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=None,
                                 pad_token_id=0)
        assert response == out[0, len(prompt):].tolist()
