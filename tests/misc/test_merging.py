"""DLER update-selective merging (arXiv 2510.15110, Sec. 4.6) on small hand-made tensors."""

import pytest
import torch

from rlspec.merging import top_k_mask, update_selective_merge


def test_per_tensor_hand_computed():
    base = {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "b": torch.zeros(3)}
    tuned = {"w": torch.tensor([[2.0, -3.0], [3.0, 4.0]]), "b": torch.tensor([0.1, -0.5, 0.2])}
    # w: delta [[1, -4], [2, 3]]; k = ceil(.25 * 4) = 1 -> keep -4 -> 1 + .7 * -4 = -1.8
    # b: delta [.1, -.5, .2]; k = ceil(.25 * 3) = ceil(.75) = 1 -> keep -.5 -> -.35
    out = update_selective_merge(base, tuned)
    torch.testing.assert_close(out["w"], torch.tensor([[1.0, -1.8], [1.0, 1.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, -0.35, 0.0]))
    # top_k = .5: w keeps -4 and 3 -> [[1, -1.8], [1, 3.1]]; b keeps ceil(1.5) = 2: -.5 and .2
    out = update_selective_merge(base, tuned, top_k=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([[1.0, -1.8], [1.0, 3.1]]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, -0.35, 0.14]))
    # top_k = 1, scale = 1 gives back the tuned model; scale = 0 gives back the base
    full = update_selective_merge(base, tuned, top_k=1.0, scale=1.0)
    torch.testing.assert_close(full["w"], tuned["w"])
    torch.testing.assert_close(full["b"], tuned["b"])
    none = update_selective_merge(base, tuned, top_k=1.0, scale=0.0)
    torch.testing.assert_close(none["w"], base["w"])


def test_global_differs_from_per_tensor():
    base = {"a": torch.zeros(2), "b": torch.zeros(4)}
    tuned = {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([0.5, 0.4, 0.3, 0.2])}
    # global: 6 entries, k = 3 -> 5, 1, .5 (a loses nothing, b keeps only .5)
    g = update_selective_merge(base, tuned, top_k=0.5, scale=1.0, per_tensor=False)
    torch.testing.assert_close(g["a"], torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(g["b"], torch.tensor([0.5, 0.0, 0.0, 0.0]))
    # per tensor: a keeps 1 of 2 (5), b keeps 2 of 4 (.5, .4)
    p = update_selective_merge(base, tuned, top_k=0.5, scale=1.0, per_tensor=True)
    torch.testing.assert_close(p["a"], torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(p["b"], torch.tensor([0.5, 0.4, 0.0, 0.0]))


def test_ties_are_deterministic_lowest_index_first():
    base = {"w": torch.zeros(4)}
    tuned = {"w": torch.tensor([-2.0, 2.0, 2.0, -2.0])}  # all |delta| = 2
    out = update_selective_merge(base, tuned, top_k=0.5, scale=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([-2.0, 2.0, 0.0, 0.0]))
    # global ties: earlier key (sorted order) first, whatever the dict order
    base2 = {"z": torch.zeros(2), "a": torch.zeros(2)}
    tuned2 = {"z": torch.ones(2), "a": torch.ones(2)}
    out2 = update_selective_merge(base2, tuned2, top_k=0.5, scale=1.0, per_tensor=False)
    torch.testing.assert_close(out2["a"], torch.ones(2))
    torch.testing.assert_close(out2["z"], torch.zeros(2))
    assert list(out2) == ["z", "a"]  # base's key order is kept
    # a large tie block: exactly k kept, the first k
    m = top_k_mask(torch.ones(100), 30)
    assert int(m.sum()) == 30 and bool(m[:30].all())


def test_keep_count_is_not_fooled_by_float_noise():
    # .7 * 10 = 7.000000000000001 in floats; ceil must still give 7, not 8
    base, tuned = {"w": torch.zeros(10)}, {"w": torch.arange(1.0, 11.0)}
    out = update_selective_merge(base, tuned, top_k=0.7, scale=1.0)
    assert int((out["w"] != 0).sum()) == 7 and out["w"][:3].eq(0).all()


def test_inputs_not_modified_and_bf16_promotion():
    base = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    tuned = {"w": torch.tensor([0.001, 0.0, 0.0, 0.0], dtype=torch.float32)}
    before = base["w"].clone()
    out = update_selective_merge(base, tuned, top_k=0.25, scale=0.5)
    assert out["w"].dtype == torch.float32
    torch.testing.assert_close(out["w"], torch.tensor([0.0005, 0.0, 0.0, 0.0]))
    assert torch.equal(base["w"], before)
    both_bf16 = update_selective_merge(base, {"w": tuned["w"].bfloat16()})
    assert both_bf16["w"].dtype == torch.bfloat16


def test_non_float_buffers():
    base = {"w": torch.zeros(2), "pos": torch.arange(4)}
    out = update_selective_merge(base, {"w": torch.ones(2), "pos": torch.arange(4)})
    assert torch.equal(out["pos"], torch.arange(4)) and out["pos"] is not base["pos"]
    with pytest.raises(ValueError, match="non-floating tensor 'pos'.*differs"):
        update_selective_merge(base, {"w": torch.ones(2), "pos": torch.arange(1, 5)})
    with pytest.raises(ValueError, match="non-floating tensor 'pos'"):
        update_selective_merge(base, {"w": torch.ones(2), "pos": torch.arange(4.0)})


@pytest.mark.parametrize(
    "tuned, msg",
    [
        ({"w": torch.ones(2)}, r"different keys \(only in base: \['pos'\]; only in tuned: \[\]\)"),
        ({"w": torch.ones(2), "pos": torch.arange(4), "extra": torch.ones(1)}, r"only in tuned: \['extra'\]"),
        ({"w": torch.ones(3), "pos": torch.arange(4)}, r"'w' has shape \[2\] in base and \[3\] in tuned"),
        ({"w": torch.tensor([1.0, float("nan")]), "pos": torch.arange(4)}, "'w' has a non-finite update"),
    ],
)
def test_bad_inputs(tuned, msg):
    base = {"w": torch.zeros(2), "pos": torch.arange(4)}
    with pytest.raises(ValueError, match=msg):
        update_selective_merge(base, tuned)


@pytest.mark.parametrize("top_k", [0, 0.0, -0.1, 1.5, True])
def test_bad_top_k(top_k):
    with pytest.raises(ValueError, match=r"top_k must be a fraction in \(0, 1\]"):
        update_selective_merge({"w": torch.zeros(2)}, {"w": torch.ones(2)}, top_k=top_k)


def test_merge_checkpoints_cli_on_hf_dirs(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlspec.merging import main

    tuned = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.linspace(-1, 1, p.numel()).reshape(p.shape))
    tuned.save_pretrained(tmp_path / "tuned")
    main([f"base={tiny_model_path}", f"tuned={tmp_path / 'tuned'}", f"out={tmp_path / 'merged'}",
          "top_k=0.5", "scale=0.5"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    delta = merged[name] - base[name]
    kept = delta != 0
    assert kept.float().mean().item() == pytest.approx(0.5, abs=0.01)
    full = torch.linspace(-1, 1, delta.numel()).reshape(delta.shape)
    torch.testing.assert_close(delta[kept], 0.5 * full[kept], atol=1e-6, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_merge_cli_errors(tmp_path, capsys):
    from rlspec.merging import main

    with pytest.raises(SystemExit):
        main([f"base={tmp_path}", f"tuned={tmp_path}", f"out={tmp_path / 'o'}"])
    assert "not a save_pretrained model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bogus=1"])
    assert "unknown config key 'bogus'" in capsys.readouterr().err
