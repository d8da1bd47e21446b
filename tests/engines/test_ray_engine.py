"""runtime=ray: the Ray rollout pool (RayRolloutEngine) and the learner actor.

One local Ray instance for the module, one 2-worker pool shared by the pool tests (they run in
file order: the pool's weights version and worker processes carry over), then a DLER run with
``runtime=ray`` whose rollout worker is killed mid-step.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from rlspec.errors import ConfigError, DataError, TrainingError  # noqa: E402
from rlspec.rollout.base import SamplingParams  # noqa: E402
from rlspec.rollout.speculative.eagle import EagleDrafter  # noqa: E402
from rlspec.rollout.native import NativeEngine  # noqa: E402
from rlspec.rollout.base import merge_stats  # noqa: E402
from rlspec.rollout.ray_engine import RayRolloutEngine, chunk_seed, split_chunks  # noqa: E402
from rlspec.rollout.ray_worker import import_ray, pack_state, unpack_state  # noqa: E402
from rlspec.config import SpeculativeConfig  # noqa: E402
from rlspec.schema import to_dict  # noqa: E402

pytestmark = pytest.mark.engines

NS = f"rlspec-test-{os.getpid()}"
V = 96
EOS = [V - 1]
CHUNK = 3
PROMPTS = [[(7 * i + j) % (V - 1) for j in range(2 + i % 4)] for i in range(10)]  # 10 prompts -> 4 chunks


@pytest.fixture(scope="module")
def ray_session():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    # 4 logical CPUs on any machine: the pool (2 x 0.5) and the DLER run (learner 0.5 + 2 x 0.5) fit
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace=NS, log_to_driver=False)
    yield
    ray.shutdown()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(4.0)  # peaked next-token distributions: greedy has no near-ties
    return m


@pytest.fixture(scope="module")
def pool(ray_session, model):
    # speculative mode "always": plain decoding until a drafter is set (test_drafter_...)
    spec = SpeculativeConfig(mode="always", sources=["eagle"], bandit={"policy": "fixed", "fixed_arms": ["3_1_3"] * 4})
    engine = RayRolloutEngine(model, None, EOS, num_workers=2, chunk_size=CHUNK, max_batch_size=8,
                              cpus_per_worker=0.5, max_worker_restarts=1, namespace=NS,
                              engine_kwargs={"speculative": spec})
    yield engine
    engine.shutdown()


def _native_by_chunk(model, params: SamplingParams, want_hidden: bool = False):
    """The reference: a local NativeEngine run chunk by chunk with the pool's derived seeds."""
    engine = NativeEngine(model, EOS, max_batch_size=8)
    out = []
    for k, rng in enumerate(split_chunks(len(PROMPTS), CHUNK)):
        seed = chunk_seed(params.seed, k) if params.seed is not None else None
        p = SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=seed)
        kw = {"return_hidden_states": True} if want_hidden else {}
        out.append(engine.generate([PROMPTS[i] for i in rng], p, **kw))
    return out


def _assert_same(result, reference_parts, hidden: bool = False, exact: bool = True):
    ids = [r for part in reference_parts for r in part.response_ids]
    assert result.response_ids == ids
    assert result.finish_reasons == [f for part in reference_parts for f in part.finish_reasons]
    assert result.prompt_ids == PROMPTS
    for a, b in zip(result.response_logprobs, [lp for part in reference_parts for lp in part.response_logprobs]):
        if exact:
            assert torch.equal(a, b)
        else:  # speculative verification computes the same logits in another shape: rounding only
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    if hidden:
        ref_hidden = [h for part in reference_parts for h in part.response_hidden_states]
        for a, b in zip(result.response_hidden_states, ref_hidden):
            assert torch.equal(a, b)


def _kill_and_wait(name: str) -> None:
    """ray.kill the named actor and return once it is really dead (its progress() fails)."""
    actor = ray.get_actor(name, namespace=NS)
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.progress.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{name} did not die")


# ------------------------------------------------------------------------------ pure helpers


def test_chunk_seeds_and_split():
    assert [list(r) for r in split_chunks(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_chunks(0, 3) == []
    seeds = [chunk_seed(5, k) for k in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**63 for s in seeds)
    assert chunk_seed(5, 1) == chunk_seed(5, 1) != chunk_seed(6, 1)


def test_merge_stats_hand_computed():
    a = {"tokens": 10.0, "prompt_tokens": 4.0, "decode_steps": 6.0, "seconds": 9.0, "spec/sd_steps": 2.0,
         "spec/accept_length": 3.0, "spec/arm/3_1_3": 2.0, "spec/reverted": 0.0, "spec/frac_steps_sd": 0.33}
    b = {"tokens": 20.0, "prompt_tokens": 6.0, "decode_steps": 14.0, "seconds": 1.0, "spec/sd_steps": 6.0,
         "spec/accept_length": 2.0, "spec/arm/3_1_3": 6.0, "spec/reverted": 1.0, "spec/frac_steps_sd": 0.43}
    out = merge_stats([a, b])
    assert out["tokens"] == 30 and out["prompt_tokens"] == 10 and out["decode_steps"] == 20
    assert out["spec/sd_steps"] == 8 and out["spec/arm/3_1_3"] == 8 and out["spec/reverted"] == 1
    assert out["spec/accept_length"] == pytest.approx((2 * 3.0 + 6 * 2.0) / 8)  # SD-step weighted: 2.25
    assert out["spec/frac_steps_sd"] == pytest.approx(8 / 20)
    assert "seconds" not in out  # wall time is the caller's


def test_pack_state_round_trips_every_dtype():
    state = {"w": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "h": torch.randn(2, 2).half(),
             "i": torch.arange(4), "s": torch.tensor(2.5, dtype=torch.bfloat16),
             "f8": torch.randn(4).to(torch.float8_e4m3fn)}
    packed = pack_state(state)
    back = unpack_state(ray.get(ray.put(packed)) if ray.is_initialized() else packed)
    assert set(back) == set(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name  # bit-exact
    assert unpack_state(state) is state  # a plain state dict passes through


def test_missing_ray_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when it is not installed
    with pytest.raises(ConfigError, match=r'pip install "rlspec\[ray\]"'):
        import_ray()


def test_init_ray_joins_or_fails_with_the_key_named(ray_session):
    import socket

    from rlspec.rollout.ray_worker import _check_reachable, init_ray

    info = init_ray(None, NS)  # already connected: a no-op that says so
    assert info["started"] is False and info["namespace"] == NS and info["resources"]["CPU"] == 4
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"ray\.address='127\.0\.0\.1:{port}'.*ray start --head"):
        _check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="ray.address='ray://head:x' is not"):
        _check_reachable("ray://head:x")


# ------------------------------------------------------------------------------ the pool


def test_pool_equals_native_chunk_by_chunk(pool, model):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=11)
    result = pool.generate(PROMPTS, params)
    _assert_same(result, _native_by_chunk(model, params))
    assert len(set(map(tuple, result.response_ids))) > 5  # real samples, not one repeated answer
    st = result.stats
    assert st["ray/chunks"] == 4 and st["ray/worker_restarts"] == 0
    assert st["ray/chunks_per_worker_max"] + st["ray/chunks_per_worker_min"] == 4
    assert st["tokens"] == sum(len(r) for r in result.response_ids)
    assert st["tokens_per_s"] == pytest.approx(st["tokens"] / st["seconds"])
    # hidden states + the pool-level long tail: called once, with samples that are in the result
    seen = []
    pool.on_long_tail = seen.append
    try:
        hidden = pool.generate(PROMPTS, params, return_hidden_states=True)
    finally:
        pool.on_long_tail = None
    _assert_same(hidden, _native_by_chunk(model, params, want_hidden=True), hidden=True)
    assert len(seen) == 1 and seen[0]
    final = {(tuple(p), tuple(r)): h for p, r, h in zip(hidden.prompt_ids, hidden.response_ids,
                                                        hidden.response_hidden_states)}
    for prompt, response, h in seen[0]:
        assert torch.equal(final[(tuple(prompt), tuple(response))], h)


def test_streams_follow_their_requests_to_the_workers(pool, model):
    """With SamplingParams.streams every chunk runs under the call's seed with its requests' keys:
    the pool samples what one local NativeEngine does, whatever the chunks (the held-out eval)."""
    keys = [(2**61 + 13 * i) % 2**63 for i in range(len(PROMPTS))]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=11, streams=keys)
    result = pool.generate(PROMPTS, params)
    local = NativeEngine(model, EOS, max_batch_size=8).generate(PROMPTS, params)
    assert result.response_ids == local.response_ids and result.finish_reasons == local.finish_reasons
    for a, b in zip(result.response_logprobs, local.response_logprobs):  # other batch shapes: rounding only
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert result.stats["ray/chunks"] == 4 and len(set(map(tuple, result.response_ids))) > 5
    with pytest.raises(ValueError, match="streams has 2 keys for 10 prompts"):
        pool.generate(PROMPTS, SamplingParams(max_new_tokens=4, seed=1, streams=[1, 2]))


def test_bad_input_fails_with_a_clear_error(pool, model):
    with pytest.raises(DataError, match="prompt 1 .*vocabulary"):
        pool.generate([[1, 2], [V + 3]], SamplingParams(max_new_tokens=4))
    with pytest.raises(ConfigError, match=r"ray\.num_rollout_workers=9 x ray\.cpus_per_worker=1.0 needs 9 CPUs"):
        RayRolloutEngine(model, None, EOS, num_workers=9, cpus_per_worker=1.0, namespace=NS)
    with pytest.raises(ConfigError, match=r"ray\.namespace=\.\.\. to a unique name"):  # the pool holds the names
        RayRolloutEngine(model, None, EOS, num_workers=1, cpus_per_worker=0.5, namespace=NS)


def test_update_weights_broadcasts_the_learners_weights(pool, model):
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    before = pool.generate(PROMPTS, greedy)
    _assert_same(before, _native_by_chunk(model, greedy))
    with torch.no_grad():
        torch.manual_seed(1)
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    stale = pool.generate(PROMPTS, greedy)  # not pushed yet: the workers still sample the old policy
    assert stale.response_ids == before.response_ids
    pool.update_weights()
    after = pool.generate(PROMPTS, greedy)
    _assert_same(after, _native_by_chunk(model, greedy))
    assert after.response_ids != before.response_ids
    assert [w["version"] for w in pool.worker_info()] == [1, 1]


def test_drafter_is_shipped_and_used_losslessly(pool, model):
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    drafter = EagleDrafter.from_target(model)
    pool.set_drafter(drafter)
    spec = pool.generate(PROMPTS, greedy)
    _assert_same(spec, _native_by_chunk(model, greedy), exact=False)  # SD on the workers is lossless
    assert spec.stats["spec/sd_steps"] > 0
    assert [w["drafter_version"] for w in pool.worker_info()] == [0, 0]
    with torch.no_grad():
        drafter.fc.weight.mul_(0.5)
    drafter.version += 1  # what the spot trainer's publish does
    pool.update_weights()
    assert [w["drafter_version"] for w in pool.worker_info()] == [1, 1]
    state = ray.get(ray.get_actor(pool.worker_names[0], namespace=NS).drafter_state.remote())
    assert torch.equal(state["fc.weight"], drafter.fc.weight)


def test_killed_worker_is_replaced_with_current_weights_and_results_are_identical(pool, model):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=23)
    reference = pool.generate(PROMPTS, params)  # no failure (speculative decoding on: same seeds, same samples)
    killed = []

    def kill_after_first_chunk(engine, worker, chunk):
        if not killed:  # the worker that returned chunk 0 dies before it gets its next chunk
            killed.append(worker)
            _kill_and_wait(engine.worker_names[worker])

    pids = {w["index"]: w["pid"] for w in pool.worker_info()}
    pool.on_chunk_done = kill_after_first_chunk
    try:
        result = pool.generate(PROMPTS, params)
    finally:
        pool.on_chunk_done = None
    assert killed
    assert result.stats["ray/worker_restarts"] == 1 and result.stats["ray/chunks"] == 4
    assert result.response_ids == reference.response_ids  # the re-queued chunk reproduced its samples
    assert result.finish_reasons == reference.finish_reasons
    assert all(torch.equal(a, b) for a, b in zip(result.response_logprobs, reference.response_logprobs))
    # the replacement is still starting (the survivor finished the call): update_weights skips it,
    # and it loads the new weights before its first chunk
    assert killed[0] in pool._starting
    with torch.no_grad():
        torch.manual_seed(2)
        for p in model.parameters():
            p.add_(0.2 * p.std() * torch.randn_like(p))
    pool.update_weights()
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    _assert_same(pool.generate(PROMPTS, greedy), _native_by_chunk(model, greedy), exact=False)
    if killed[0] in pool._starting:  # let it finish starting: it then gets chunks of the next call
        ray.get(pool._starting[killed[0]])
    second = pool.generate(PROMPTS, greedy)
    assert second.stats["ray/chunks_per_worker_min"] >= 1  # both workers sampled
    _assert_same(second, _native_by_chunk(model, greedy), exact=False)
    info = {w["index"]: w for w in pool.worker_info()}
    assert info[killed[0]]["pid"] != pids[killed[0]]  # a new process under the same actor name
    assert [w["version"] for w in info.values()] == [3, 3] == [pool.weights_ref()[0]] * 2
    assert [w["drafter_version"] for w in info.values()] == [1, 1]


def test_too_many_deaths_raise_a_clear_error(pool):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    pool.max_worker_restarts = 0
    pool.on_chunk_done = lambda engine, worker, chunk: _kill_and_wait(engine.worker_names[worker])
    try:
        with pytest.raises(TrainingError, match=r"ray\.max_worker_restarts=0"):
            pool.generate(PROMPTS, params)
    finally:
        pool.on_chunk_done = None
        pool.max_worker_restarts = 1


def test_remote_spot_trainer_trains_like_the_local_one(ray_session, model):
    """The drafter trainer as an actor: same buffer, seed and steps -> the same drafter weights as
    SpotDrafterTrainer in-process, published into the learner's drafter with its version."""
    from rlspec.config import OnlineDrafterConfig
    from rlspec.rollout.speculative.remote_spot_trainer import RemoteSpotTrainer
    from rlspec.rollout.speculative.spot_trainer import SpotDrafterTrainer

    rollout = NativeEngine(model, EOS, max_batch_size=8).generate(
        PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0, seed=5), return_hidden_states=True)
    settings = OnlineDrafterConfig(lr=1e-3, batch_size=2, window=16, max_steps=3)
    local_drafter, remote_drafter = EagleDrafter.from_target(model), EagleDrafter.from_target(model)
    local = SpotDrafterTrainer(local_drafter, settings, seed=0)
    remote = RemoteSpotTrainer(remote_drafter, model, settings, seed=0, namespace=NS, num_cpus=0.5)
    try:
        samples = list(zip(rollout.prompt_ids, rollout.response_ids, rollout.response_hidden_states))
        added = [[spot.buffer.add_response(1, p, r, h) for p, r, h in samples] for spot in (local, remote)]
        assert added[0] == added[1] and sum(added[0]) >= 5
        assert remote.buffer.num_pairs == local.buffer.num_pairs > 0
        local.start()
        local._thread.join()  # let it run its 3 steps (as the remote one below)
        m_local = local.stop(1)
        remote.start()
        deadline = time.monotonic() + 60
        while remote.trainer.total_steps < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        m_remote = remote.stop(1)
    finally:
        remote.shutdown()
    assert m_remote["drafter/steps"] == m_local["drafter/steps"] == 3
    assert m_remote["drafter/loss"] == pytest.approx(m_local["drafter/loss"], rel=1e-5)
    assert remote_drafter.version == local_drafter.version == 1 and remote.published_step == 1
    for (name, a), (_, b) in zip(local_drafter.state_dict().items(), remote_drafter.state_dict().items()):
        torch.testing.assert_close(b, a, msg=name)
    assert not torch.equal(remote_drafter.fc.weight, EagleDrafter.from_target(model).fc.weight)  # it trained


# ------------------------------------------------------------------------------ a DLER run


@pytest.mark.slow
def test_dler_run_with_runtime_ray_survives_a_killed_rollout_worker(ray_session, tiny_model_path, tmp_path):
    """The acceptance test: DLER, runtime=ray, 2 rollout workers, the learner as an actor; one rollout
    worker is killed from outside (by name) while it generates step 1's rollouts."""
    from conftest import TINY_OVERRIDES, compose_config

    from rlspec.ray_runtime import run_learner

    ns = f"{NS}-dler"
    steps, prompts_per_step, n = 2, 4, 4
    cfg = compose_config([*TINY_OVERRIDES, "+recipe=dler", f"run_dir={tmp_path}", f"trainer.steps={steps}",
                          f"trainer.prompts_per_step={prompts_per_step}", f"rollout.n={n}",
                          "rollout.max_response_length=64", "eval.at_start=false", "trainer.save_every=0",
                          # dynamic sampling off: the tiny model gets whole groups wrong, and every step
                          # must train so that the weights version (the killer's clock) advances
                          "trainer.filter_groups.enable=false",
                          "runtime=ray", "ray.num_rollout_workers=2", "ray.chunk_size=1", "ray.cpus_per_worker=0.5",
                          f"ray.namespace={ns}"])
    resolved = to_dict(cfg)
    victim = "rlspec-rollout-1"
    fired: list[dict] = []
    stop = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 240
        actor = None
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                actor = actor or ray.get_actor(victim, namespace=ns)
                prog = ray.get(actor.progress.remote(), timeout=10)
            except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.02)
                continue
            # weights v0 = step 1 (no eval at start); busy after one chunk = mid-rollout of a training step
            if prog["version"] == 0 and prog["busy"] and prog["chunks_done"] >= 1:
                ray.kill(actor, no_restart=True)
                fired.append(prog)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = run_learner(cfg, resolved, num_cpus=0.5)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert fired, (f"the killer never saw {victim} (namespace {ns}) busy in step 1's rollout: is runtime=ray "
                   "wired in rlspec.session.build_trainer?")
    assert summary["steps"] == steps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if "batch/groups_generated" in r}
    assert sorted(train_rows) == [1, 2]
    for r in train_rows.values():  # every prompt's group came back complete and was trained on
        assert r["batch/groups_generated"] == r["batch/groups_kept"] == prompts_per_step
        assert r["actor/num_updates"] > 0
        assert r["ray/chunks"] == prompts_per_step * n  # ray.chunk_size=1
    assert train_rows[steps]["ray/worker_restarts_total"] == 1
    # the final eval ran through the pool too, every problem answered (TINY_OVERRIDES: 8 problems x 1 sample)
    assert summary["end"]["eval/num_samples"] == 8
    assert summary["end"]["eval/mean_tokens"] > 0


@pytest.mark.slow
def test_speculative_ray_run_trains_the_drafter_in_its_actor_and_resumes(ray_session, tiny_model_path, tmp_path):
    """runtime=ray with TLT: SD on the rollout workers, the spot trainer as an actor publishing into
    the learner's drafter (shipped to the workers with the policy), checkpointed and restored."""
    from conftest import TINY_OVERRIDES, compose_config

    from rlspec.rollout.speculative.remote_spot_trainer import RemoteSpotTrainer
    from rlspec.session import build_trainer

    ns = f"{NS}-spec"
    cfg = compose_config([*TINY_OVERRIDES, f"run_dir={tmp_path}", "+recipe=grpo", "eval.at_start=false",
                          "eval.at_end=false", "rollout.speculative.enable=true", "rollout.speculative.mode=always",
                          "rollout.speculative.drafter_warmup_steps=5", "runtime=ray", "ray.num_rollout_workers=2",
                          "ray.chunk_size=4", "ray.cpus_per_worker=0.5", f"ray.namespace={ns}"])
    trainers = [build_trainer(cfg, tmp_path)]
    try:
        trainer = trainers[0]
        spot = trainer.online_drafting.spot
        assert isinstance(trainer.engine, RayRolloutEngine) and isinstance(spot, RemoteSpotTrainer)
        metrics = [trainer.train_step() for _ in range(2)]
        assert all(m["spec/sd_steps"] > 0 for m in metrics)
        assert sum(m["drafter/steps"] for m in metrics) > 0  # trained in the actor during the long tail
        version = trainer.engine.drafter.version
        assert version == metrics[-1]["drafter/version"]
        assert [w["drafter_version"] for w in trainer.engine.worker_info()] == [version, version]
        path = trainer.save()
        saved = {k: v.clone() for k, v in trainer.engine.drafter.state_dict().items()}
        spot_steps, published = spot.trainer.total_steps, spot.published_step
        assert spot_steps > 0 and (path / "spot_trainer" / "state.pt").is_file()
        trainer.engine.shutdown()
        spot.shutdown()
        trainers.append(build_trainer(cfg, tmp_path))
        resumed = trainers[1]
        with torch.no_grad():
            resumed.engine.drafter.fc.weight.add_(1.0)
        assert resumed.maybe_resume() == path
        for k, v in resumed.engine.drafter.state_dict().items():
            torch.testing.assert_close(v, saved[k])
        actor = ray.get_actor("rlspec-drafter-trainer", namespace=ns)
        assert ray.get(actor.info.remote())["drafter_version"] == version  # synced by sync_from_drafter
        # the actor's optimizer state, step count and buffer came back from the checkpoint
        resumed_spot = resumed.online_drafting.spot
        assert resumed_spot.trainer.total_steps == spot_steps and resumed_spot.published_step == published
        assert resumed_spot.buffer.num_pairs > 0
        assert [w["drafter_version"] for w in resumed.engine.worker_info()] == [version, version]
    finally:
        for t in trainers:
            t.engine.shutdown()
            t.online_drafting.spot.shutdown()


def test_worker_copy_keeps_the_learners_float32_rope_buffers_in_bf16():
    """A bf16 learner keeps RoPE's non-persistent inv_freq in float32; the worker's copy must too
    (a plain dtype cast rounds it, and rollout log-probs drift from the learner's with position)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlspec.rollout.ray_worker import build_model, learner_spec, pack_state

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    learner = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    for _, buf in learner.named_buffers():  # as from_pretrained(dtype=bf16) leaves them: float32
        buf.data = buf.data.float()
    rope = {k: v for k, v in learner.named_buffers() if "inv_freq" in k}
    assert rope and all(v.dtype == torch.float32 for v in rope.values())
    copy = build_model(learner_spec(learner), pack_state(learner.state_dict()), "cpu")
    got = dict(copy.named_buffers())
    for name, value in rope.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], value), name
    ids = torch.randint(0, 64, (1, 400))
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, learner.eval()(ids).logits)
