"""GGUF models (issue 19.1): ``model.path=FILE.gguf`` or ``model.path=DIR model.gguf_file=NAME``,
dequantized once into a normal HF directory that training, checkpoints and export use.

The GGUF file is written here from the tiny embedded model (F32, llama.cpp's Qwen2 layout and its
byte-level BPE tokenizer), so the loaded model can be compared with the one it came from.
"""

from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES, compose_config
from rlspec.errors import ModelLoadError
from rlspec.models import check_model_path, gguf_model_dir, gguf_source, load_causal_lm, load_tokenizer
from tests.models.gguf_writer import write_qwen2_gguf

pytest.importorskip("gguf", reason="the GGUF tests need the gguf package (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    return write_qwen2_gguf(tiny_model_path, folder / "tiny-qwen2-f32.gguf")


@pytest.fixture()
def cache_home(tmp_path, monkeypatch) -> Path:
    """A fresh model cache for the dequantized directories."""
    monkeypatch.setenv("RLSPEC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_gguf_loads_as_the_model_it_was_written_from(tiny_gguf, tiny_model_path, cache_home):
    model = load_causal_lm(str(tiny_gguf))
    ref = load_causal_lm(str(tiny_model_path))
    ids = torch.tensor([[1, 5, 9, 33, 100, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    tok, ref_tok = load_tokenizer(str(tiny_gguf)), load_tokenizer(str(tiny_model_path))
    text = "What is 12+3? <think>\n15</think> \\boxed{15}"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.chat_template == ref_tok.chat_template and tok.eos_token == ref_tok.eos_token


def test_dequantized_directory_is_a_plain_hf_dir_built_once(tiny_gguf, cache_home, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = gguf_model_dir(str(tiny_gguf), "bfloat16", progress=False)
    assert out.parent == cache_home / "models" and "bfloat16" in out.name
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)  # no gguf_file, no quantization_config
    assert next(model.parameters()).dtype == torch.bfloat16
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.architectures == ["Qwen2ForCausalLM"]
    assert AutoTokenizer.from_pretrained(out).chat_template
    monkeypatch.setattr("rlspec.models.load_gguf_model", lambda *a, **k: pytest.fail("converted twice"))
    assert gguf_model_dir(str(tiny_gguf), "bfloat16", progress=False) == out
    assert gguf_model_dir(str(out), "bfloat16") == out  # not a GGUF file: unchanged


def test_gguf_file_inside_model_path(tiny_gguf):
    assert gguf_source(str(tiny_gguf.parent), tiny_gguf.name) == str(tiny_gguf)
    assert gguf_source("some/dir", None) == "some/dir"
    with pytest.raises(ModelLoadError, match=r"no such file in .*GGUF files there: tiny-qwen2-f32.gguf"):
        gguf_source(str(tiny_gguf.parent), "other.gguf")
    with pytest.raises(ModelLoadError, match="model.gguf_file='x.gguf' needs model.path"):
        gguf_source(None, "x.gguf")
    with pytest.raises(ModelLoadError, match="is not a .gguf file name"):
        gguf_source(str(tiny_gguf.parent), "model.bin")


def test_missing_gguf_file_and_gguf_only_dir_name_the_fix(tiny_gguf, tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such GGUF file; .*model.gguf_file=NAME.gguf"):
        check_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match=r"without config.json; .*add model.gguf_file=tiny-qwen2-f32.gguf"):
        check_model_path(str(tiny_gguf.parent))


def test_missing_gguf_package_is_one_error_naming_the_install(tiny_gguf, cache_home, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(ModelLoadError) as err:
            load(str(tiny_gguf))
        assert "needs the gguf package: pip install gguf accelerate" in str(err.value)
        assert "\n" not in str(err.value)


def test_training_from_a_gguf_writes_normal_checkpoints(tiny_gguf, tiny_model_path, cache_home, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlspec.session import build_trainer

    run_dir = tmp_path / "run"
    cfg = compose_config([*TINY_OVERRIDES, f"run_dir={run_dir}", f"model.path={tiny_gguf.parent}",
                          f"model.gguf_file={tiny_gguf.name}", f"data.path={tiny_model_path}", "trainer.steps=1",
                          "eval.at_start=false", "eval.at_end=false", "logger.plot=false"])
    trainer = build_trainer(cfg, run_dir)
    assert Path(trainer.start_model_path).parent == cache_home / "models"
    trainer.fit()
    saved = run_dir / "checkpoints" / "step_000001" / "model"
    assert (saved / "config.json").is_file() and (saved / "tokenizer.json").is_file()
    AutoModelForCausalLM.from_pretrained(saved)
