"""``python -m rlspec.export``: a run's checkpoint as a clean HF model dir with a model card.

The run directory is written by the real trainer (``rlspec.train.run``, one step of the DLER recipe
on the tiny embedded model), so config.yaml, summary.json, metrics.jsonl and the checkpoint layout
are rlspec's own. One step on the tiny model gets zero advantages and leaves the weights unchanged,
so the fixture then adds a fixed perturbation to the checkpoint's weights (saved back in the same
format): without it "merged == tuned" and "merged == base" could not tell anything apart.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_OVERRIDES, compose_config
from rlspec.errors import ConfigError
from rlspec.export import main, parse_args, resolve_checkpoint
from rlspec.manifest import write_manifest
from rlspec.schema import to_dict

PROMPT = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def run_dir(tiny_model_path, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from rlspec.session import run

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("export") / "run"
    cfg = compose_config([*TINY_OVERRIDES, "+recipe=dler", "run_name=tiny-dler", f"run_dir={path}",
                          "trainer.steps=1", "eval.num_problems=4", "logger.plot=false"])
    run(cfg, to_dict(cfg))
    model_dir = path / "checkpoints" / "step_000001" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.linspace(-1, 1, p.numel()).reshape(p.shape))
    model.save_pretrained(model_dir, safe_serialization=True)
    write_manifest(model_dir.parent)  # the checkpoint was changed on purpose: record its new files
    return path


def _export(capsys, *args) -> str:
    main([str(a) for a in args])
    return capsys.readouterr().out


def _error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlspec: error: ") and "\n" not in err, err  # one line
    return err


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_export_is_a_plain_hf_model_equal_to_the_checkpoint(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exports" / "tiny"
    printed = _export(capsys, f"run_dir={run_dir}", f"out={out}")
    assert f"-> {out}" in printed and "no drafter found" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temporary dir left beside it
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names and not any(n.endswith(".bin") for n in names)

    ckpt = run_dir / "checkpoints" / "step_000001" / "model"
    model, ref = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(ckpt)
    tok, ref_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and tok.chat_template == ref_tok.chat_template
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref_ids = ref_tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(ids["input_ids"], ref_ids["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ref(**ref_ids).logits)

    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["do_sample"]) == (0.6, 0.95, 0, True)
    assert gen["eos_token_id"] == ref.config.eos_token_id and gen["pad_token_id"] == ref.config.pad_token_id

    card = (out / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    end = summary["end"]
    assert "# tiny-dler" in card and "DLER: truncation penalty" in card  # run_name and recipe_notes
    exported_row = next(line for line in card.splitlines() if "step 1 (exported)" in line)
    assert f"| {100 * end['eval/accuracy']:.1f}% | {end['eval/mean_tokens']:.1f} |" in exported_row
    start_row = next(line for line in card.splitlines() if line.startswith("| start (step 0)"))
    assert f"{summary['start']['eval/mean_tokens']:.1f}" in start_row
    assert f"AutoModelForCausalLM.from_pretrained({str(out)!r})" in card
    assert "```yaml\nrun_name: tiny-dler\n" in card and "## Merge" not in card

    # the card's usage code runs as written (generation shortened to keep the test fast)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "model.generate(**inputs)" in code
    exec(code.replace("model.generate(**inputs)", "model.generate(**inputs, max_new_tokens=4)"), {})
    assert capsys.readouterr().out.strip()


def test_generation_config_follows_the_runs_eval_sampling(run_dir, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    config = OmegaConf.load(run_copy / "config.yaml")
    config.eval.temperature, config.eval.top_p = 0.8, 0.9
    OmegaConf.save(config, run_copy / "config.yaml")
    _export(capsys, f"run_dir={run_copy}", f"out={tmp_path / 'out'}")
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"]) == (0.8, 0.9)


def test_merge_top_k_1_scale_1_is_the_tuned_model_and_scale_0_the_base(run_dir, tiny_model_path, tmp_path, capsys):
    tuned = _weights(run_dir / "checkpoints" / "step_000001" / "model")
    base = _weights(tiny_model_path)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(tuned[name], base[name])

    printed = _export(capsys, f"run_dir={run_dir}", f"out={tmp_path / 'full'}", f"merge.base={tiny_model_path}",
                      "merge.top_k=1.0", "merge.scale=1.0")
    assert "merged (DLER update-selective)" in printed
    full = _weights(tmp_path / "full")
    for key in tuned:  # base + 1 * (tuned - base), in float32
        torch.testing.assert_close(full[key], tuned[key], rtol=0, atol=1e-6)

    # merge.base=start: the run's model.path is null, so its embedded preset (tiny) is the base
    _export(capsys, f"run_dir={run_dir}", f"out={tmp_path / 'none'}", "merge.base=start", "merge.scale=0")
    none = _weights(tmp_path / "none")
    assert all(torch.equal(none[key], base[key]) for key in base)
    card = (tmp_path / "none" / "README.md").read_text()
    assert "## Merge" in card and "- scale: 0.0" in card and "merge.base=start" in card
    assert "not the trained checkpoint itself" in card

    # half the entries of each tensor's update (the largest), halved: 0.5 * delta where kept, 0 elsewhere
    _export(capsys, f"run_dir={run_dir}", f"out={tmp_path / 'half'}", "merge.base=start", "merge.top_k=0.5",
            "merge.scale=0.5", "merge.per_tensor=true")
    got = _weights(tmp_path / "half")[name] - base[name]
    delta = tuned[name] - base[name]
    kept = got != 0
    assert kept.sum().item() == delta.numel() // 2
    assert delta[kept].abs().min() >= delta[~kept].abs().max()
    torch.testing.assert_close(got[kept], 0.5 * delta[kept], rtol=0, atol=1e-6)


def test_refuses_to_overwrite_and_protects_the_run(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _error(capsys, f"run_dir={run_dir}", f"out={out}")
    assert str(out) in err and "overwrite=true" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _export(capsys, f"run_dir={run_dir}", f"out={out}", "overwrite=true")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    err = _error(capsys, f"run_dir={run_dir}", f"out={run_dir}", "overwrite=true")
    assert "would replace the run directory" in err
    assert (run_dir / "checkpoints" / "step_000001" / "model" / "config.json").is_file()


def test_bad_checkpoint_names_the_available_ones(run_dir, tmp_path, capsys):
    err = _error(capsys, f"run_dir={run_dir}", f"out={tmp_path / 'o'}", "checkpoint=step_000099")
    assert "checkpoint=step_000099" in err and "available: latest (= step_000001), step_000001" in err
    assert not (tmp_path / "o").exists()


def test_missing_run_dir_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    err = _error(capsys, f"run_dir={missing}", f"out={tmp_path / 'o'}")
    assert f"run_dir={missing} does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no checkpoint" in _error(capsys, f"run_dir={empty}", f"out={tmp_path / 'o'}")


def test_drafter_is_copied_as_a_sibling(run_dir, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    drafter = run_copy / "checkpoints" / "step_000001" / "drafter"
    (drafter / "sub").mkdir(parents=True)
    (drafter / "config.json").write_text('{"drafter": true}')
    (drafter / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    printed = _export(capsys, f"run_dir={run_copy}", f"out={tmp_path / 'm'}")
    sibling = tmp_path / "m-drafter"
    assert f"drafter: {sibling}" in printed
    assert (sibling / "config.json").read_text() == '{"drafter": true}'
    assert (sibling / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
    assert "m-drafter/" in (tmp_path / "m" / "README.md").read_text()
    # an existing drafter export is not replaced without overwrite=true, and then nothing is written
    (tmp_path / "m2-drafter").mkdir()
    (tmp_path / "m2-drafter" / "old.txt").write_text("old")
    err = _error(capsys, f"run_dir={run_copy}", f"out={tmp_path / 'm2'}")
    assert f"{tmp_path / 'm2-drafter'} exists" in err and "overwrite=true" in err
    assert not (tmp_path / "m2").exists()


def _touch_checkpoint(root: Path, name: str) -> None:
    (root / name / "model").mkdir(parents=True)
    (root / name / "model" / "config.json").write_text("{}")


def test_checkpoint_resolution_latest_step_number_and_tags(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_000001", "step_000002", "step_000003"):
        _touch_checkpoint(root, name)
    (root / "step_000004.tmp-123" / "model").mkdir(parents=True)  # a checkpoint being written
    (root / "latest").write_text("step_000002\n")
    (root / "tags.json").write_text(json.dumps({"siri-low": ["step_000001", "step_000003"],
                                                "siri-high": ["step_000002"], "gone": ["step_000000"]}))
    assert resolve_checkpoint(tmp_path, "latest") == (root / "step_000002", "")
    assert resolve_checkpoint(tmp_path, "3") == (root / "step_000003", "")
    assert resolve_checkpoint(tmp_path, "step_000001") == (root / "step_000001", "")
    assert resolve_checkpoint(tmp_path, "siri-high") == (root / "step_000002", "")
    path, note = resolve_checkpoint(tmp_path, "siri-low")  # a tag on two checkpoints: the newest
    assert path == root / "step_000003" and "step_000001, step_000003" in note
    with pytest.raises(ConfigError, match="none of which is left"):
        resolve_checkpoint(tmp_path, "gone")
    with pytest.raises(ConfigError, match=r"tags: gone \(step_000000\), siri-high \(step_000002\)"):
        resolve_checkpoint(tmp_path, "siri")
    (root / "latest").write_text("step_000009")  # stale pointer: the newest complete checkpoint
    path, note = resolve_checkpoint(tmp_path, "latest")
    assert path == root / "step_000003" and "step_000009" in note
    assert (root / "step_000004.tmp-123").is_dir()  # read-only: leftovers are not removed


@pytest.mark.parametrize("args, message", [
    (["run_dir=r"], "missing out=DIR"),
    (["run_dir=r", "out=o", "checkpiont=latest"], r"unknown config key 'checkpiont' \(did you mean 'checkpoint'\?\)"),
    (["run_dir=r", "out=o", "merge.scale=0.5"], "merge.scale is set but merge.base is not"),
    (["run_dir=r", "out=o", "merge.base=start", "merge.top_k=1.5"], r"merge.top_k must be a fraction in \(0, 1\]"),
    (["run_dir=r", "out=o", "merge.base=start", "merge.scale=x"], "merge.scale must be a number"),
    (["run_dir=r", "out=o", "overwrite=maybe"], "overwrite must be true or false"),
])
def test_argument_errors_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(args)


def test_exported_model_evaluates_to_the_same_numbers(run_dir, tmp_path, capsys):
    """Round trip: the exported dir, loaded fresh and evaluated with rlspec.eval, gives the same
    samples and metrics as the run's checkpoint under the same settings."""
    import json

    from rlspec.eval import main as eval_main

    out = tmp_path / "exported"
    _export(capsys, f"run_dir={run_dir}", f"out={out}")
    args = ["eval.benchmarks=[heldout]", "model.embedded_preset=tiny", "eval.samples=2", "eval.max_new_tokens=24",
            "eval.limit=4", "eval.seeding=shared", "progress=off"]
    eval_main([f"model.path={run_dir / 'checkpoints' / 'step_000001' / 'model'}", f"out={tmp_path / 'e1'}", *args])
    eval_main([f"model.path={out}", f"out={tmp_path / 'e2'}", *args])
    capsys.readouterr()
    a = json.loads((tmp_path / "e1" / "summary.json").read_text())["benchmarks"]["heldout"]["metrics"]
    b = json.loads((tmp_path / "e2" / "summary.json").read_text())["benchmarks"]["heldout"]["metrics"]
    assert a == b
    texts = [json.loads(line)["samples"] for line in (tmp_path / "e1" / "heldout.jsonl").read_text().splitlines()]
    again = [json.loads(line)["samples"] for line in (tmp_path / "e2" / "heldout.jsonl").read_text().splitlines()]
    assert [[s["text"] for s in r] for r in texts] == [[s["text"] for s in r] for r in again]
