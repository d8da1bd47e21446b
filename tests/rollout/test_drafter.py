"""EAGLE drafter (TLT arXiv 2511.16665, EAGLE arXiv 2401.15077): shift, shared weights, cached step vs
training forward, tree drafting, compaction, loss, buffer, preemptible trainer, save/load, warm-up."""

import json
import math
import threading
import time

import pytest
import torch

from rlspec.errors import ConfigError, ModelLoadError
from rlspec.rollout.speculative.drafter_buffer import DrafterBuffer
from rlspec.rollout.speculative.drafter_training import DrafterTrainer, drafter_loss, eagle_training_pairs
from rlspec.rollout.speculative.eagle import EagleDrafter
from rlspec.rollout.speculative.warmup import warmup_drafter
from rlspec.warmup_drafter import main
import rlspec.rollout.fast_backend as fast_backend
from rlspec.rollout.fast_backend import LlamaFastBackend
from rlspec.rollout.native import NativeEngine
from rlspec.rollout.base import SamplingParams

torch.set_num_threads(1)

H, V = 32, 64


def tiny_target(arch: str = "qwen2", hidden: int = H, vocab: int = V, seed: int = 0):
    import transformers as tf

    kw = dict(
        hidden_size=hidden, num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
        num_hidden_layers=2, intermediate_size=64, head_dim=hidden // 2, max_position_embeddings=128,
    )
    cfg, cls = {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    return cls(cfg(**kw)).eval()


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def causal_mask(pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[n] positions -> bool [n, 1, 1, kv_len]: column <= position."""
    return (torch.arange(kv_len)[None, :] <= pos[:, None]).view(-1, 1, 1, kv_len)


# ------------------------------------------------------------------------------ convention


def test_eagle_shift_hand_example():
    a, b, c, d = 7, 8, 9, 10
    ids = torch.tensor([a, b, c, d])
    hidden = torch.tensor([[0.0, 0.5], [1.0, 1.5], [2.0, 2.5], [3.0, 3.5]])  # h0..h3
    d_ids, d_hid, tgt = eagle_training_pairs(ids, hidden)
    assert d_ids.tolist() == [b, c, d]  # pairs (b,h0), (c,h1), (d,h2)
    assert d_hid.tolist() == [[0.0, 0.5], [1.0, 1.5], [2.0, 2.5]]
    assert tgt.tolist() == [[1.0, 1.5], [2.0, 2.5], [3.0, 3.5]]  # regress h1, h2, h3
    with pytest.raises(ValueError):
        eagle_training_pairs(ids, hidden[:3])


def test_buffer_rollout_alignment_matches_target_hidden(target):
    """NativeEngine's hidden states, stored by add_rollout, are h_t at the stored token's position."""
    prompts = [[1, 2, 3, 4], [5, 6]]
    result = NativeEngine(target, eos_token_ids=[]).generate(
        prompts, SamplingParams(max_new_tokens=5, seed=0), return_hidden_states=True
    )
    buf = DrafterBuffer()
    assert buf.add_rollout(0, result) == 2
    for sample, p, r, lps in zip(buf._samples, result.prompt_ids, result.response_ids, result.response_logprobs):
        full = torch.tensor([p + r])
        with torch.no_grad():
            ref = target.model(input_ids=full).last_hidden_state[0]  # post-final-norm
        assert sample.start_pos == len(p) - 1
        assert sample.input_ids.tolist() == [p[-1]] + r[:-1]
        assert sample.loss_mask.tolist() == [False] + [True] * (len(r) - 1)
        positions = sample.start_pos + torch.arange(len(r))
        torch.testing.assert_close(sample.hidden, ref[positions], atol=1e-5, rtol=1e-5)
        # h_t is the state whose logits sampled x_{t+1}: lm_head(hidden[t]) reproduces the rollout logprobs
        with torch.no_grad():
            lp = torch.log_softmax(target.lm_head(sample.hidden), -1)[torch.arange(len(r)), torch.tensor(r)]
        torch.testing.assert_close(lp, lps, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- the module


def test_shared_embed_lm_head_are_the_targets_and_frozen(target):
    drafter = EagleDrafter.from_target(target)
    assert drafter.embed_tokens.weight is target.model.embed_tokens.weight
    assert drafter.lm_head.weight is target.lm_head.weight
    own = {id(p) for p in drafter.parameters()}
    assert id(target.model.embed_tokens.weight) not in own and id(target.lm_head.weight) not in own
    assert all(k.startswith(("fc.", "layer.")) for k in drafter.state_dict())
    assert isinstance(drafter.layer.input_layernorm, torch.nn.Identity)
    assert type(drafter.layer) is type(target.model.layers[0])
    assert drafter.fc.weight.shape == (H, 2 * H) and drafter.fc.bias is None
    # frozen for the drafter: its loss gives no gradient to the shared weights, only to fc + layer
    target.zero_grad(set_to_none=True)
    ids, hid = torch.randint(0, V, (1, 6)), torch.randn(1, 6, H)
    pred, logits = drafter(ids, hid)
    (pred.square().mean() + logits.logsumexp(-1).mean()).backward()
    assert target.model.embed_tokens.weight.grad is None and target.lm_head.weight.grad is None
    assert drafter.fc.weight.grad is not None and drafter.layer.self_attn.q_proj.weight.grad is not None
    assert target.model.embed_tokens.weight.requires_grad  # the RL-trained target is left alone
    # TLT-code behaviour on request: requires_grad=False on the shared weights
    other = tiny_target()
    EagleDrafter.from_target(other, freeze_shared=True)
    assert not other.model.embed_tokens.weight.requires_grad and not other.lm_head.weight.requires_grad
    # a copy shares the target parts and copies only the trainable weights
    twin = drafter.clone()
    assert twin.embed_tokens.weight is target.model.embed_tokens.weight
    assert twin.fc.weight is not drafter.fc.weight and torch.equal(twin.fc.weight, drafter.fc.weight)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        EagleDrafter.from_target(gpt2)


@pytest.mark.parametrize("small_row_linear", [False, True])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral"])
def test_step_prefill_then_decode_equals_training_forward(arch, small_row_linear, monkeypatch):
    if small_row_linear:  # the (W @ x^T)^T path that large weights take on CPU
        monkeypatch.setattr(fast_backend, "SMALL_ROW_LINEAR", True)
        monkeypatch.setattr(fast_backend, "SMALL_LINEAR_MIN_WEIGHT", 0)
    tgt = tiny_target(arch)
    drafter = EagleDrafter.from_target(tgt, seed=1)
    torch.manual_seed(2)
    ids, hid = torch.randint(0, V, (2, 9)), torch.randn(2, 9, H)
    with torch.no_grad():
        ref, ref_logits = drafter(ids, hid)
    lens = [5, 3]  # rows prefilled separately with different lengths, then decoded together
    drafter.begin(num_slots=2, max_len=12)
    for r, n in enumerate(lens):
        out = drafter.step(ids[r : r + 1, :n], hid[r : r + 1, :n], None, None, n, rows=slice(r, r + 1))
        torch.testing.assert_close(out[0], ref[r, :n], atol=1e-5, rtol=1e-5)
    pos = torch.tensor(lens)
    for _ in range(4):
        kv_len = int(pos.max()) + 1
        r_idx = torch.arange(2)
        new_ids, new_hid = ids[r_idx, pos][:, None], hid[r_idx, pos][:, None]
        out = drafter.step(new_ids, new_hid, pos[:, None], causal_mask(pos, kv_len), kv_len)
        torch.testing.assert_close(out[:, 0], ref[r_idx, pos], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(drafter.logits(out[:, 0]), ref_logits[r_idx, pos], atol=1e-4, rtol=1e-4)
        pos = pos + 1


def test_step_tree_mask_with_cache_cols_equals_forward_on_each_path(target):
    drafter = EagleDrafter.from_target(target, seed=3)
    torch.manual_seed(4)
    prefix_ids, prefix_hid = torch.randint(0, V, (1, 5)), torch.randn(1, 5, H)
    # tree: r (pos 5) -> a, b (both pos 6) ; a -> c (pos 7); columns 5, 6, 7, 8
    node_ids, node_hid = torch.randint(0, V, (1, 4)), torch.randn(1, 4, H)
    parents = [None, 0, 0, 1]
    positions = torch.tensor([[5, 6, 6, 7]])
    cols = torch.tensor([[5, 6, 7, 8]])
    kv_len = 9
    mask = torch.zeros(1, 1, 4, kv_len, dtype=torch.bool)
    mask[..., :5] = True
    paths = []
    for i in range(4):
        path, j = [], i
        while j is not None:
            path.insert(0, j)
            j = parents[j]
        paths.append(path)
        for j in path:
            mask[0, 0, i, 5 + j] = True
    drafter.begin(1, 16)
    drafter.step(prefix_ids, prefix_hid, None, None, 5)
    out = drafter.step(node_ids, node_hid, positions, mask, kv_len, cache_cols=cols)
    for i, path in enumerate(paths):
        seq_ids = torch.cat([prefix_ids, node_ids[:, path]], dim=1)
        seq_hid = torch.cat([prefix_hid, node_hid[:, path]], dim=1)
        with torch.no_grad():
            ref, _ = drafter(seq_ids, seq_hid)
        torch.testing.assert_close(out[0, i], ref[0, -1], atol=1e-5, rtol=1e-5)


def test_remove_compacts_like_the_fast_backend(target):
    lens = [3, 2, 4, 1]
    backend = LlamaFastBackend(target)
    backend.begin(4, 8)
    backend.prefill([[1] * n for n in lens], False)
    expected = backend.remove([0, 2])
    drafter = EagleDrafter.from_target(target, seed=5)
    torch.manual_seed(6)
    ids, hid = torch.randint(0, V, (4, 6)), torch.randn(4, 6, H)
    drafter.begin(4, 8)
    for r, n in enumerate(lens):
        drafter.step(ids[r : r + 1, :n], hid[r : r + 1, :n], None, None, n, rows=slice(r, r + 1))
    order = drafter.remove([0, 2])
    assert order == expected == [3, 1]
    assert drafter.n == 2
    # the surviving rows continue correctly from their own caches
    pos = torch.tensor([lens[o] for o in order])
    sel = torch.tensor(order)
    kv_len = int(pos.max()) + 1
    out = drafter.step(ids[sel, pos][:, None], hid[sel, pos][:, None], pos[:, None], causal_mask(pos, kv_len), kv_len)
    with torch.no_grad():
        ref, _ = drafter(ids, hid)
    torch.testing.assert_close(out[:, 0], ref[sel, pos], atol=1e-5, rtol=1e-5)
    assert drafter.remove([1]) == [0] and drafter.n == 1
    with pytest.raises(ValueError):
        drafter.remove([3])


def test_step_reads_weights_in_place(target):
    drafter = EagleDrafter.from_target(target, seed=7)
    ids, hid = torch.randint(0, V, (1, 4)), torch.randn(1, 4, H)
    drafter.begin(1, 8)
    before = drafter.step(ids, hid, None, None, 4)
    with torch.no_grad():
        drafter.layer.mlp.down_proj.weight.mul_(2.0)
    after = drafter.step(ids, hid, None, None, 4)
    with torch.no_grad():
        ref, _ = drafter(ids, hid)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- the loss


def test_loss_matches_hand_computation():
    pred_h = torch.tensor([[[0.0, 1.0], [50.0, -50.0]]])
    tgt_h = torch.tensor([[[0.5, 3.0], [0.0, 0.0]]])
    pred_l = torch.tensor([[[1.0, 2.0, 0.0], [90.0, 0.0, 0.0]]])
    tgt_l = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, 90.0]]])
    mask = torch.tensor([[True, False]])  # second token ignored
    # SmoothL1(beta=1): |0-0.5|=0.5 -> 0.5*0.5^2 = 0.125 ; |1-3|=2 -> 2-0.5 = 1.5 ; mean over H = 0.8125
    vloss = (0.125 + 1.5) / 2
    # target p = softmax(0, 0, ln2) = (1/4, 1/4, 1/2); -sum p log_softmax(1, 2, 0) = logZ - (0.25*1 + 0.25*2 + 0)
    log_z = math.log(math.e + math.e**2 + 1.0)
    ploss = log_z - 0.75
    loss, m = drafter_loss(pred_h, tgt_h, pred_l, tgt_l, mask)
    assert m["vloss"] == pytest.approx(vloss, rel=1e-6)
    assert m["ploss"] == pytest.approx(ploss, rel=1e-6)
    assert loss.item() == pytest.approx(1.0 * vloss + 0.1 * ploss, rel=1e-6)
    assert m["tokens"] == 1.0 and m["top1"] == 0.0  # argmax 1 vs argmax 2
    loss2, _ = drafter_loss(pred_h, tgt_h, pred_l, tgt_l, mask, value_weight=0.5, prob_weight=2.0)
    assert loss2.item() == pytest.approx(0.5 * vloss + 2.0 * ploss, rel=1e-6)


def test_top1_agreement_metric():
    pred_l = torch.tensor([[[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 9.0]]])
    tgt_l = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [9.0, 0.0]]])
    mask = torch.tensor([[True, True, True, False]])  # agree, agree, disagree, (ignored disagree)
    z = torch.zeros(1, 4, 2)
    _, m = drafter_loss(z, z, pred_l, tgt_l, mask)
    assert m["top1"] == pytest.approx(2 / 3)
    _, empty = drafter_loss(z, z, pred_l, tgt_l, torch.zeros(1, 4, dtype=torch.bool))
    assert empty == {"loss": 0.0, "vloss": 0.0, "ploss": 0.0, "top1": 0.0, "tokens": 0.0}


# ------------------------------------------------------------------------------ the buffer


def fake_sample(prompt_len: int, resp_len: int, hidden: int = 4, base: int = 0):
    t = prompt_len + resp_len
    ids = torch.arange(base, base + t)
    hid = torch.arange(base, base + t, dtype=torch.float32)[:, None].repeat(1, hidden)
    mask = torch.arange(t) >= prompt_len
    return ids, hid, mask


def test_buffer_keeps_last_steps_and_max_samples():
    buf = DrafterBuffer(keep_steps=2, max_samples=4)
    for step in (0, 1, 2):
        assert buf.add(step, *fake_sample(3, 5))
    assert buf.steps == [1, 2]
    assert not buf.add(0, *fake_sample(3, 5))  # older than the kept steps
    assert buf.add(1, *fake_sample(3, 5)) and len(buf) == 3
    assert not buf.add(2, *fake_sample(3, 0)) and not buf.add(2, *fake_sample(0, 1))  # no trainable pair
    for i in range(3):
        buf.add(2, *fake_sample(3, 5, base=100 + i))
    assert len(buf) == 4  # at most max_samples, the oldest dropped first
    assert [int(s.input_ids[0]) for s in buf._samples][-3:] == [100, 101, 102]
    buf.add(3, *fake_sample(3, 5))
    assert buf.steps == [2, 3]
    assert DrafterBuffer().sample_windows(2) is None


def test_buffer_windows_stay_on_response_tokens_and_mix_steps():
    buf = DrafterBuffer(keep_steps=2, current_fraction=0.5)
    starts = {}
    for i, (step, p, r) in enumerate([(0, 6, 40), (0, 4, 30), (1, 5, 6), (1, 7, 9)]):
        base = 1000 * (i + 1)
        buf.add(step, *fake_sample(p, r, base=base), start_pos=10)
        starts[base] = p
    window = 8
    batch = buf.sample_windows(64, window, torch.Generator().manual_seed(0))
    assert batch.input_ids.shape[0] == 64 and batch.input_ids.shape[1] <= window
    assert 0 < batch.num_current < 64 and sorted(set(batch.steps)) == [0, 1]
    for i in range(64):
        w = int(batch.attention_mask[i].sum())
        assert 2 <= w <= window and not batch.attention_mask[i, w:].any()
        ids = batch.input_ids[i, :w]
        base = int(ids[0]) // 1000 * 1000
        offset = int(ids[0]) - base
        assert ids.tolist() == list(range(base + offset, base + offset + w))  # a contiguous slice
        assert torch.equal(batch.hidden[i, :w, 0], ids.float())
        assert batch.position_ids[i, 0] == 10 + offset
        assert offset >= starts[base] - 1  # at most one token before the response
        assert batch.loss_mask[i, 1:w].all()  # every trained pair's input token is a response token
        assert batch.loss_mask[i, :w].tolist() == [o >= starts[base] for o in range(offset, offset + w)]
    only_new = DrafterBuffer(current_fraction=1.0)
    only_old = DrafterBuffer(current_fraction=0.0)
    for b in (only_new, only_old):
        b.add(0, *fake_sample(2, 20))
        b.add(1, *fake_sample(2, 20))
    assert only_new.sample_windows(16, 8, torch.Generator().manual_seed(1)).steps == [1] * 16
    assert only_old.sample_windows(16, 8, torch.Generator().manual_seed(1)).steps == [0] * 16


# ----------------------------------------------------------------------------- the trainer


def random_buffer(target, n: int = 4, steps=(0,)) -> DrafterBuffer:
    buf = DrafterBuffer()
    gen = torch.Generator().manual_seed(0)
    for step in steps:
        for _ in range(n):
            ids = torch.randint(0, V, (20,), generator=gen)
            with torch.no_grad():
                hid = target.model(input_ids=ids[None]).last_hidden_state[0]
            buf.add(step, ids, hid, torch.arange(20) >= 4)
    return buf


def test_stop_event_deadline_and_empty_buffer_preempt(target):
    drafter = EagleDrafter.from_target(target)
    trainer = DrafterTrainer(drafter, batch_size=2, window=16)
    empty = trainer.train(DrafterBuffer(), 10)
    assert empty["steps"] == 0 and empty["stopped"] == "empty" and drafter.version == 0
    buf = random_buffer(target)
    stop = threading.Event()
    stop.set()
    res = trainer.train(buf, 10, stop_event=stop)
    assert res["steps"] == 0 and res["stopped"] == "stop_event" and drafter.version == 0
    res = trainer.train(buf, 10, deadline=time.monotonic() - 1.0)
    assert res["steps"] == 0 and res["stopped"] == "deadline"
    # a background run stops promptly once the event is set
    stop = threading.Event()
    out = {}
    thread = threading.Thread(target=lambda: out.update(trainer.train(buf, 10**9, stop_event=stop)))
    thread.start()
    time.sleep(0.3)
    stop.set()
    thread.join(timeout=5.0)
    assert not thread.is_alive()
    assert out["stopped"] == "stop_event" and out["steps"] > 0
    assert drafter.version >= 1
    for (name, p), q in zip(drafter.named_parameters(), trainer.shadow.parameters()):
        assert torch.equal(p, q.to(p.dtype)), name  # the final weights were published


def test_publish_waits_for_readers_and_bumps_version(target):
    drafter = EagleDrafter.from_target(target)
    trainer = DrafterTrainer(drafter, batch_size=2, window=16, publish_every=0)
    buf = random_buffer(target)
    before = drafter.fc.weight.clone()
    trainer.train_step(buf.sample_windows(2, 16, trainer.generator))
    with drafter.lock:  # a reader mid-draft-round: nothing is written under it
        ok = threading.Thread(target=lambda: setattr(trainer, "_try", trainer.publish(blocking=False)))
        ok.start()
        ok.join()
        assert trainer._try is False and drafter.version == 0 and torch.equal(drafter.fc.weight, before)
    assert trainer.publish() and drafter.version == 1
    assert not torch.equal(drafter.fc.weight, before)


def test_training_on_own_generations_lowers_loss_and_raises_top1(tiny_model_path):
    from rlspec.config import DataConfig
    from rlspec.data import load_split
    from rlspec.models import eos_token_ids, load_causal_lm, load_tokenizer
    from rlspec.data import build_prompt_ids

    path = str(tiny_model_path)
    tokenizer, model = load_tokenizer(path), load_causal_lm(path).eval()
    rows = load_split(path, "train")[:16]
    prompts = build_prompt_ids(tokenizer, rows, DataConfig().instruction)
    drafter, metrics = warmup_drafter(
        model, tokenizer, prompts, 100, max_new_tokens=48, rollout_batch_size=16, batch_size=4, window=64,
        lr=3e-3, eval_windows=8, eos_token_ids=eos_token_ids(model, tokenizer), log=None,
    )
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert metrics["train"]["steps"] == 100 and metrics["samples"] > 0
    assert after["loss"] < 0.7 * before["loss"]
    assert after["top1"] > before["top1"] + 0.2
    assert drafter.version >= 1


# ---------------------------------------------------------------------------- save / load


def test_save_load_roundtrip_and_mismatched_target(target, tmp_path):
    drafter = EagleDrafter.from_target(target, seed=11)
    drafter.version = 7
    out = drafter.save(tmp_path / "drafter")
    meta = json.loads((out / "drafter_config.json").read_text())
    assert meta["target_architecture"] == "Qwen2ForCausalLM" and meta["hidden_size"] == H and meta["vocab_size"] == V
    assert meta["version"] == 7 and "x_{t+1}" in meta["eagle_convention"]
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert keys == set(drafter.state_dict()) and all(k.startswith(("fc.", "layer.")) for k in keys)
    loaded = EagleDrafter.load(out, target)
    assert loaded.version == 7 and loaded.lm_head.weight is target.lm_head.weight
    ids, hid = torch.randint(0, V, (2, 7)), torch.randn(2, 7, H)
    with torch.no_grad():
        a, la = drafter(ids, hid)
        b, lb = loaded(ids, hid)
    assert torch.equal(a, b) and torch.equal(la, lb)
    loaded.begin(2, 8)
    torch.testing.assert_close(loaded.step(ids, hid, None, None, 7), a, atol=1e-5, rtol=1e-5)
    # overwrite in place (atomic swap), no temp dirs left behind
    drafter.version = 8
    drafter.save(out)
    assert EagleDrafter.load(out, target).version == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drafter"]
    for other, what in [
        (tiny_target(hidden=48), "hidden size"),
        (tiny_target(vocab=80), "vocabulary size"),
        (tiny_target("llama"), "architecture"),
    ]:
        with pytest.raises(ModelLoadError, match=what):
            EagleDrafter.load(out, other)
    with pytest.raises(ModelLoadError, match="not a drafter directory"):
        EagleDrafter.load(tmp_path, target)


def test_cli_writes_a_loadable_drafter(tiny_model_path, tmp_path, capsys):
    from rlspec.models import load_causal_lm

    out = tmp_path / "d"
    main([f"model={tiny_model_path}", f"out={out}", "steps=3", "num_prompts=2", "max_new_tokens=8", "window=16",
          "rollout_batch_size=2"])
    assert "drafter written to" in capsys.readouterr().out
    drafter = EagleDrafter.load(out, load_causal_lm(str(tiny_model_path)))
    assert drafter.version >= 1
    with pytest.raises(SystemExit):
        main([f"model={tiny_model_path}", "bogus=1"])
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def test_spot_trainer_state_round_trip_continues_training_exactly(target):
    """A resumed spot trainer (drafter weights + state_dict: optimizer moments, step count, RNG,
    buffer) takes the same next steps as the uninterrupted one."""
    from rlspec.config import OnlineDrafterConfig
    from rlspec.rollout.speculative.spot_trainer import SpotDrafterTrainer

    first = SpotDrafterTrainer(EagleDrafter.from_target(target), OnlineDrafterConfig(lr=1e-3, batch_size=2, window=16))
    first.buffer = random_buffer(target)
    first.trainer.train(first.buffer, 3)
    state = first.state_dict()
    assert state["buffer"] is not None and state["buffer_bytes"] == first.buffer.nbytes > 0
    saved = {k: v.clone() for k, v in first.drafter.state_dict().items()}

    resumed = SpotDrafterTrainer(EagleDrafter.from_target(target), OnlineDrafterConfig(lr=1e-3, batch_size=2, window=16))
    resumed.drafter.load_state_dict(saved)
    resumed.trainer.sync_from_drafter()
    resumed.load_state_dict(state)
    assert resumed.trainer.total_steps == 3 and resumed.buffer.num_pairs == first.buffer.num_pairs
    first.trainer.train(first.buffer, 2)
    resumed.trainer.train(resumed.buffer, 2)
    for (name, p), q in zip(first.drafter.named_parameters(), resumed.drafter.parameters()):
        assert torch.equal(p, q), name
    # a fresh optimizer (no moments) would have taken different steps
    fresh = SpotDrafterTrainer(EagleDrafter.from_target(target), OnlineDrafterConfig(lr=1e-3, batch_size=2, window=16))
    fresh.drafter.load_state_dict(saved)
    fresh.trainer.sync_from_drafter()
    fresh.trainer.generator.set_state(state["trainer"]["generator"])
    fresh.trainer.train(first.buffer, 2)
    assert not torch.equal(fresh.drafter.fc.weight, first.drafter.fc.weight)
    # over the size limit the buffer is left out (a resumed run refills it from its next rollout)
    tight = SpotDrafterTrainer(EagleDrafter.from_target(target), OnlineDrafterConfig(checkpoint_buffer_mb=0.0))
    tight.buffer = first.buffer
    assert tight.state_dict()["buffer"] is None


def test_spot_trainer_publishes_only_when_the_rollout_ends(target):
    """A spot trainer that reaches ``max_steps`` while the long tail still decodes keeps its weights
    to itself: the engine drafts with one drafter version for the whole rollout, and the trained
    weights reach it at ``stop()`` (the rollout's end), with the next policy weights (TLT)."""
    from rlspec.config import OnlineDrafterConfig
    from rlspec.rollout.speculative.spot_trainer import SpotDrafterTrainer

    spot = SpotDrafterTrainer(EagleDrafter.from_target(target),
                              OnlineDrafterConfig(lr=1e-3, batch_size=2, window=16, max_steps=3))
    spot.buffer = random_buffer(target)
    before = {k: v.clone() for k, v in spot.drafter.state_dict().items()}
    spot.start()
    spot._thread.join()  # max_steps reached; the rollout has not ended
    assert spot.trainer.total_steps == 3
    assert spot.drafter.version == 0
    assert all(torch.equal(v, before[k]) for k, v in spot.drafter.state_dict().items())  # nothing published
    metrics = spot.stop(1)  # the rollout ends
    assert metrics["drafter/steps"] == 3 and spot.drafter.version == 1 and metrics["drafter/version"] == 1.0
    for (name, p), q in zip(spot.drafter.named_parameters(), spot.trainer.shadow.parameters()):
        assert torch.equal(p, q.to(p.dtype)), name  # the trained weights, published once
    assert spot.published_step == 1 and metrics["drafter/lag_steps"] == 0.0
    assert spot.stop(2)["drafter/lag_steps"] == 1.0 and spot.drafter.version == 1  # nothing new: no publish


# ------------------------------------------------------------------- the buffer's memory bound


def test_buffer_is_bounded_in_bytes_and_drops_the_oldest_first():
    per_token = DrafterBuffer.bytes_per_token(4, torch.float32)  # hidden 4 x 4 bytes + id 8 + mask 1
    assert per_token == 4 * 4 + 8 + 1
    buf = DrafterBuffer(keep_steps=2, max_bytes=30 * per_token)
    assert buf.add(0, *fake_sample(2, 8, base=100))  # 10 tokens
    assert buf.add(1, *fake_sample(2, 8, base=200))
    assert buf.nbytes == 20 * per_token
    assert buf.add(1, *fake_sample(2, 13, base=300))  # 15 more: over 30, the oldest (step 0) goes
    assert [int(s.input_ids[0]) for s in buf._samples] == [200, 300] and buf.nbytes == 25 * per_token
    assert buf.add(1, *fake_sample(2, 8, base=400))  # 10 more: 35 > 30, drops 200
    assert [int(s.input_ids[0]) for s in buf._samples] == [300, 400] and buf.nbytes <= 30 * per_token
    assert not buf.add(1, *fake_sample(2, 40, base=500))  # alone over the bound: not stored
    assert [int(s.input_ids[0]) for s in buf._samples] == [300, 400]
    with pytest.raises(ConfigError, match="max_bytes"):
        DrafterBuffer(max_bytes=0)


def test_bytes_per_token_is_what_the_buffer_holds():
    """README's figure: hidden_size x dtype bytes (one layer: the last, post-norm) + 9 bytes of token
    id and loss mask; Qwen2.5-7B (hidden 3584, bf16): 7177 bytes, 7.0 KiB a token."""
    buf = DrafterBuffer()
    buf.add(0, torch.arange(12), torch.randn(12, 64, dtype=torch.bfloat16), torch.arange(12) >= 3)
    assert buf.nbytes == 12 * DrafterBuffer.bytes_per_token(64, torch.bfloat16) == 12 * (64 * 2 + 9)
    assert DrafterBuffer.bytes_per_token(3584, torch.bfloat16) == 7177


def test_spot_trainer_buffer_bound_comes_from_the_config_and_its_size_is_logged(target):
    from rlspec.config import OnlineDrafterConfig
    from rlspec.rollout.speculative.online import OnlineDrafting
    from rlspec.rollout.speculative.spot_trainer import SpotDrafterTrainer

    assert OnlineDrafterConfig().buffer_mb == 2048.0
    with pytest.raises(ConfigError, match="rollout.speculative.online.buffer_mb"):
        OnlineDrafterConfig(buffer_mb=0)
    spot = SpotDrafterTrainer(EagleDrafter.from_target(target), OnlineDrafterConfig(buffer_mb=0.5))
    assert spot.buffer.max_bytes == 2**19
    online = OnlineDrafting(NativeEngine(target, eos_token_ids=[]), spot)
    result = online.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0), step=1)
    assert spot.buffer.nbytes == 2 * 8 * DrafterBuffer.bytes_per_token(H, torch.float32) > 0
    assert result.stats["drafter/buffer_bytes"] == spot.buffer.nbytes
    assert all(s.hidden.device.type == "cpu" for s in spot.buffer._samples)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: hidden states leave the GPU")
def test_hidden_states_are_collected_into_pinned_host_memory(monkeypatch):
    """On a GPU the rollout's hidden states go to pinned host memory as they are collected (each
    step's are copied out), so neither the call nor the drafter buffer keeps them on the GPU; the
    switch to speculation takes the tail rows' states back from there."""
    import rlspec.rollout.native as native
    from rlspec.config import SpeculativeConfig

    model = tiny_target().cuda()
    drafter = EagleDrafter.from_target(model)

    engine = NativeEngine(model, eos_token_ids=[], speculative=SpeculativeConfig(mode="always", sources=["eagle"]))
    engine.set_drafter(drafter)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    staged = []
    real_to_host = native.to_host
    monkeypatch.setattr(native, "to_host", lambda t, **kw: staged.append(real_to_host(t, **kw)) or staged[-1])
    out = engine.generate([[1, 2, 3], [4, 5]], params, return_hidden_states=True)
    assert all(h.device.type == "cpu" and h.shape == (12, H) for h in out.response_hidden_states)
    assert out.stats["spec/sd_steps"] > 0  # the switch ran on the kept (host) states
    assert staged and all(t.device.type == "cpu" and t.is_pinned() for t in staged)  # every step's copy
    plain = NativeEngine(model, eos_token_ids=[]).generate([[1, 2, 3], [4, 5]], params, return_hidden_states=True)
    assert out.response_ids == plain.response_ids
    for a, b in zip(out.response_hidden_states, plain.response_hidden_states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    buf = DrafterBuffer()
    buf.add(0, torch.arange(12), torch.randn(12, H, device="cuda"), torch.arange(12) >= 3)
    assert buf._samples[0].hidden.device.type == "cpu"
