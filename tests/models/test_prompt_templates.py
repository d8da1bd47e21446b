"""``data.prompt_template`` (issue 19.3): one function builds the prompts of training, the held-out
eval and ``rlspec.eval``; base models take a plain template and need no chat template."""

from pathlib import Path

import pytest

from conftest import compose_config
from rlspec.data import build_messages, build_prompt_ids, build_prompt_texts
from rlspec.errors import ConfigError, ModelLoadError
from rlspec.evals.model_card import RunInfo, model_card
from rlspec.evals.runner import RunnerSettings
from rlspec.models import load_tokenizer
from rlspec.prompts import R1_ZERO, check_prompt_template

ROWS = [{"question": "What is 2+3?"}, {"question": "Compute $\\frac{1}{2}$."}]
INSTR = "Put the answer in \\boxed{}."


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(str(tiny_model_path))


def test_r1_zero_is_deepseek_r1_zero_text_opening_the_thinking(tok):
    texts = build_prompt_texts(tok, ROWS, INSTR, "r1_zero")
    assert texts[0].startswith("A conversation between User and Assistant. The user asks a question, and the "
                               "Assistant solves it. The assistant first thinks about the reasoning process")
    assert texts[0].endswith("<answer> answer here </answer>.\nUser: What is 2+3?\nPut the answer in \\boxed{}."
                             "\nAssistant: <think>")
    assert texts[1] == R1_ZERO.replace("{question}", f"{ROWS[1]['question']}\n{INSTR}")


def test_plain_and_user_templates_substitute_only_the_question(tok):
    assert build_prompt_texts(tok, ROWS[:1], INSTR, "plain") == [f"What is 2+3?\n{INSTR}\n"]
    assert build_prompt_texts(tok, ROWS[:1], "", "plain") == ["What is 2+3?\n"]
    own = "Problem: {question}\nWrite {answer} as \\boxed{}.\nSolution:"
    assert build_prompt_texts(tok, ROWS[1:], "", own) == ["Problem: Compute $\\frac{1}{2}$.\nWrite {answer} as "
                                                          "\\boxed{}.\nSolution:"]


def test_chat_is_the_tokenizers_template_as_before(tok):
    expected = [tok.apply_chat_template(build_messages(r["question"], INSTR), tokenize=False,
                                        add_generation_prompt=True) for r in ROWS]
    assert build_prompt_texts(tok, ROWS, INSTR) == expected == build_prompt_texts(tok, ROWS, INSTR, "chat")
    assert build_prompt_ids(tok, ROWS, INSTR) == [tok(t, add_special_tokens=False)["input_ids"] for t in expected]


def test_plain_templates_get_the_tokenizers_special_tokens():
    class Bos:  # a base model's tokenizer that starts every text with BOS (id 1)
        chat_template = None

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [([1] if add_special_tokens else []) + [ord(c) for c in t] for t in texts]}

    ids = build_prompt_ids(Bos(), ROWS[:1], "", "plain")
    assert ids == [[1] + [ord(c) for c in "What is 2+3?\n"]]


def test_no_chat_template_is_refused_only_for_chat_naming_the_fix(tok, tiny_model_path):
    bare = load_tokenizer(str(tiny_model_path))  # loads: the template is checked where prompts are built
    bare.chat_template = None
    with pytest.raises(ModelLoadError) as err:
        build_prompt_texts(bare, ROWS, INSTR)
    msg = str(err.value)
    assert "has no chat_template" in msg and "set data.prompt_template=r1_zero" in msg and "\n" not in msg
    assert build_prompt_texts(bare, ROWS, INSTR, "r1_zero") == build_prompt_texts(tok, ROWS, INSTR, "r1_zero")


def test_the_key_is_checked_at_config_time():
    with pytest.raises(ConfigError, match=r"data.prompt_template='r1-zero' is neither chat, a named template "
                                          r"\(r1_zero, plain\) nor a string containing \{question\}"):
        compose_config(["reward=correctness", "data.prompt_template=r1-zero"])
    cfg = compose_config(["reward=correctness", "data.prompt_template='Q: {question} A:'"])
    assert cfg.data.prompt_template == "Q: {question} A:"
    with pytest.raises(ConfigError, match="eval.prompt_template="):
        check_prompt_template("bogus", "eval.prompt_template")
    with pytest.raises(ConfigError, match="eval.prompt_template"):
        RunnerSettings(prompt_template="bogus")


def test_eval_fingerprint_unchanged_for_chat_and_distinct_for_plain():
    chat = RunnerSettings()
    assert chat.record()["prompt_template"] == "chat"
    # the settings as written before prompt_template and last_number_fallback existed: old files resume
    keep = {k: v for k, v in chat.record().items()
            if k not in ("max_batch_size", "call_rows", "prompt_template", "last_number_fallback")}
    import hashlib
    import json

    keep["sampler"] = 2
    assert chat.fingerprint() == hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
    assert RunnerSettings(prompt_template="r1_zero").fingerprint() != chat.fingerprint()


def _card(config: dict) -> str:
    return model_card(RunInfo(config=config, config_path=Path("config.yaml")), run_dir=Path("run"),
                      checkpoint=Path("run/checkpoints/step_000002"), step=2, note="", out=Path("out"),
                      generation={"temperature": 0.6}, merge=None, drafter=None)


def test_model_card_records_the_prompt_template():
    card = _card({"run_name": "x", "data": {"prompt_template": "r1_zero", "instruction": ""}})
    assert "`data.prompt_template`: `r1_zero`, no chat template" in card
    assert "prompt = 'A conversation between User and Assistant." in card and "What is 17 * 23?\\nAssistant: <think>'" in card
    assert "apply_chat_template" not in card
    chat = _card({"run_name": "x", "data": {"prompt_template": "chat"}})
    assert "apply_chat_template" in chat and "(`data.prompt_template=chat`)" in chat


def test_l1_targets_go_into_the_plain_templates_question(tok):
    import random

    from rlspec.rewards.l1 import L1_TEMPLATE
    from rlspec.trainers.hooks.l1 import l1_budgeted_prompts

    out = l1_budgeted_prompts(["What is 2+3?"], 1, tok, INSTR, 7, 7, L1_TEMPLATE, random.Random(0), "r1_zero")
    target = L1_TEMPLATE.format(budget=7)
    assert tok.decode(out.prompt_ids[0]).endswith(f"User: What is 2+3?\n{INSTR} {target}\nAssistant: <think>")
    bare = l1_budgeted_prompts(["What is 2+3?"], 1, tok, "", 7, 7, L1_TEMPLATE, random.Random(0), "plain")
    assert tok.decode(bare.prompt_ids[0]) == f"What is 2+3? {target}\n"


def test_rlspec_eval_on_a_model_without_chat_template(tiny_model_path, tmp_path, capsys):
    import shutil

    from rlspec.eval import main

    base = tmp_path / "base-model"  # the tiny model as a base model: no chat template
    shutil.copytree(tiny_model_path, base)
    (base / "chat_template.jinja").unlink()
    args = [f"model.path={base}", "eval.benchmarks=[heldout]", "eval.limit=2", "eval.samples=1",
            "eval.max_new_tokens=4", "progress=off"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"out={tmp_path / 'chat'}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("rlspec: error: the tokenizer")  # before loading the model
    assert "eval.prompt_template=r1_zero" in err and "\n" not in err
    main([*args, "eval.prompt_template=r1_zero", f"out={tmp_path / 'r1'}"])
    lines = (tmp_path / "r1" / "heldout.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"prompt_template": "r1_zero"' in (tmp_path / "r1" / "summary.json").read_text()
