import json
import re
import random
import os
import time

import pytest
import torch

from rlspec import embedded, embedded_build, tasks
from rlspec.embedded import EmbeddedModelConfig, get_embedded_model_path
from rlspec.errors import ConfigError

# A smaller-than-tiny build keeps this file fast; accuracy is not tested here.
FAST = dict(sft_steps=60, n_train=600, n_test=16, n_eval=8, eval_max_new_tokens=96)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("rlspec_home")
    cfg = EmbeddedModelConfig.tiny(**FAST)
    t0 = time.time()
    path = get_embedded_model_path(cfg, cache_dir=cache, progress=False)
    return cfg, cache, path, time.time() - t0


def test_cache_key_deterministic_and_sensitive():
    a, b = EmbeddedModelConfig.tiny(), EmbeddedModelConfig.tiny()
    assert a.cache_key() == b.cache_key()
    assert len(a.cache_key()) == 12
    assert EmbeddedModelConfig.tiny(seed=1).cache_key() != a.cache_key()
    assert EmbeddedModelConfig().cache_key() != a.cache_key()
    assert EmbeddedModelConfig(levels=[1, 2, 3, 4, 5]).cache_key() == EmbeddedModelConfig().cache_key()


def _small_split_and_tokenizer():
    """300 train problems and a 512-token tokenizer trained on their worked solutions."""
    train, _ = tasks.make_splits(0, 300, 20)
    rng = random.Random(0)
    return train, embedded_build.build_tokenizer(
        [tasks.worked_solution(p, rng, tasks.sample_num_rechecks(rng, 4)) for p in train], 512)


def test_budget_solutions_fit_the_budget():
    """A budget-prefilled SFT solution has the most re-checks that fit within the budget (EOS counted)."""
    from rlspec.embedded_sft import fit_budget

    train, tok = _small_split_and_tokenizer()

    def n_tokens(text):
        return len(tok(text, add_special_tokens=False)["input_ids"]) + 1

    for p in train[:40]:
        lens = [n_tokens(tasks.worked_solution(p, random.Random(1), k)) for k in range(5)]
        for budget in (20, lens[0], lens[1] - 1, lens[2], 10_000):
            text = fit_budget(p, random.Random(1), 4, budget, tok)
            expected = max([j for j in range(5) if lens[j] <= budget], default=0)
            assert tasks.count_rechecks(text) == expected, (p.expression, budget, lens)
            assert text.endswith(f"\\boxed{{{p.answer}}}.")


def test_sft_batches_carry_budget_prefills():
    """About budget_frac of the later solutions carry the HBPO prefill, and fit their budget."""
    from rlspec.embedded_sft import sft_batches

    cfg = EmbeddedModelConfig.tiny(sft_steps=200, drill_frac=0.0, plain_frac=0.5, budget_frac=0.5)
    train, tok = _small_split_and_tokenizer()
    eos = tok.convert_tokens_to_ids(embedded_build.EOS_TOKEN)
    texts = [tok.decode(row[row != tok.pad_token_id]) for ids, _ in sft_batches(cfg, train, tok, eos) for row in ids]
    budgeted = [t for t in texts if "I will answer the question within" in t]
    assert 0.15 < len(budgeted) / len(texts) < 0.35  # half of the later half
    for t in budgeted:
        b = int(t.split("the question within ")[1].split(" tokens")[0])
        assert b in cfg.budgets
        completion = t.split(" tokens.\n", 1)[1]
        n = len(tok(completion, add_special_tokens=False)["input_ids"])
        assert n <= b or tasks.count_rechecks(completion) == 0


def test_sft_data_has_slips_spirals_and_l1_targets():
    """The later SFT solutions: first passes slip more on harder levels (never on level 1) and a
    re-check corrects them; a spiral_frac share are spirals cut without EOS; an l1_frac share
    carry L1's target with a completion near it (within 15%, or under it for L1-Max)."""
    from rlspec.embedded_sft import sft_batches

    cfg = EmbeddedModelConfig.tiny(sft_steps=400, drill_frac=0.0, plain_frac=0.0, budget_frac=0.3, l1_frac=0.2,
                                   spiral_frac=0.05, spiral_tokens=(100, 140))
    train, tok = _small_split_and_tokenizer()
    eos = tok.convert_tokens_to_ids(embedded_build.EOS_TOKEN)
    rows = [(row, lab) for ids, labels in sft_batches(cfg, train, tok, eos) for row, lab in zip(ids, labels)]
    texts = [tok.decode(row[row != tok.pad_token_id]) for row, _ in rows]
    ended = [int(eos) in lab.tolist() for _, lab in rows]
    spirals = [t for t, e in zip(texts, ended) if not e]
    assert 0.03 < len(spirals) / len(texts) < 0.07
    for t in spirals:
        completion = t.split("<think>\n", 1)[1]
        n = len(tok(completion, add_special_tokens=False)["input_ids"])
        assert "</think>" not in completion and tasks.count_rechecks(completion) >= 1 and 95 <= n <= 140
    slipped = {lv: [0, 0] for lv in tasks.ALL_LEVELS}
    for t, e in zip(texts, ended):
        if not e:
            continue
        question = t.split("user\n", 1)[1].split("\n", 1)[0]
        level = next(p.level for p in train if p.question == question)
        completion = t.split("<think>\n", 1)[1]
        first = completion[: tasks.first_pass_end(completion)]
        answer = next(p.answer for p in train if p.question == question)
        slipped[level][0] += not first.endswith(f" {answer}.")
        slipped[level][1] += 1
        if "No, " in completion:  # a corrected slip ends with the right answer
            assert tasks.extract_boxed_int(completion) == answer
    share = {lv: a / b for lv, (a, b) in slipped.items()}
    assert share[1] == 0 and share[5] > share[3] > share[2] and abs(share[5] - cfg.slip_rates[4]) < 0.12, share
    l1 = [t for t in texts if "Think for" in t]
    assert 0.12 < len(l1) / len(texts) < 0.28
    for t in l1:
        target = int(re.search(r"Think for (?:maximum )?(\d+) tokens", t).group(1))
        n = len(tok(t.split("<think>\n", 1)[1].replace("<|im_end|>", ""), add_special_tokens=False)["input_ids"]) + 1
        if "maximum" in t:
            assert n <= target <= 1.41 * n + 1
        else:
            assert 0.84 * n - 1 <= target <= 1.16 * n + 1


def test_budget_forcing_cuts_after_the_first_pass(monkeypatch):
    """The forced prompt is the response cut after its first pass + </think> + the answer prefix;
    cut accuracy comes from the greedy continuation; no first pass counts as wrong."""
    from rlspec import embedded_eval

    train, tok = _small_split_and_tokenizer()
    p = next(q for q in train if q.level == 4)
    seen = []

    class FakeEngine:
        def __init__(self, *a, **k):
            pass

        def generate(self, prompts, params):
            seen.extend(tok.decode(x) for x in prompts)
            first = [re.findall(r"So the result is (\d+)\.", tok.decode(x))[-1] for x in prompts]
            return type("R", (), {"response_ids": [tok(f"{f}}}.", add_special_tokens=False)["input_ids"] for f in first]})()

    monkeypatch.setattr(embedded_eval, "NativeEngine", FakeEngine)
    prompt = embedded_eval.prompt_text(tok, p)
    slip = tasks.worked_solution(p, random.Random(0), 1, slip=True)
    clean = tasks.worked_solution(p, random.Random(0), 1)
    records = [{"level": 4, "correct": True, "rechecks": 1, "prompt": prompt, "text": slip},
               {"level": 4, "correct": True, "rechecks": 1, "prompt": prompt, "text": clean},
               {"level": 4, "correct": False, "rechecks": 0, "prompt": prompt, "text": "garbage"}]
    # the fake "model" answers with the first pass's result
    out = embedded_eval.budget_forcing(None, tok, [p, p, p], records)
    assert len(seen) == 2 and all(s.endswith(embedded_eval.FORCED_ANSWER) for s in seen)
    assert "Wait" not in seen[0] and out["4"] == {"n": 3, "full": 0.6667, "cut": 0.3333, "drop": 33.3,
                                                  "rechecked": 0.6667}


def test_config_errors():
    with pytest.raises(ConfigError, match="budget_frac"):
        EmbeddedModelConfig(budget_frac=1.5)
    with pytest.raises(ConfigError, match="budgets"):
        EmbeddedModelConfig(budgets=[0, 64])
    with pytest.raises(ConfigError, match="n_eval"):
        EmbeddedModelConfig(n_eval=1000, n_test=10)
    with pytest.raises(ConfigError, match="slip_rates"):
        EmbeddedModelConfig(slip_rates=[0.1, 0.2])
    with pytest.raises(ConfigError, match="l1_frac"):
        EmbeddedModelConfig(budget_frac=0.8, l1_frac=0.3)
    with pytest.raises(ConfigError, match="spiral_tokens"):
        EmbeddedModelConfig(spiral_tokens=[300, 100])
    with pytest.raises(ConfigError, match="hidden_size"):
        EmbeddedModelConfig(hidden_size=130, num_attention_heads=4)


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RLSPEC_HOME", str(tmp_path))
    assert embedded.default_cache_dir() == tmp_path
    monkeypatch.delenv("RLSPEC_HOME")
    assert embedded.default_cache_dir().name == "rlspec"


def test_build_layout(built):
    cfg, cache, path, _ = built
    assert path.parent == cache / "models" and path.name == f"embedded-{cfg.cache_key()}"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "train.jsonl", "test.jsonl", "build_card.json"):
        assert (path / name).is_file(), name
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".")]  # temp dir moved
    card = json.loads((path / "build_card.json").read_text())
    assert card["cache_key"] == cfg.cache_key() and card["params"] > 0
    assert card["config"]["sft_steps"] == FAST["sft_steps"]
    for key in ("t0.6_p0.95", "t1.0"):
        ev = card["eval"][key]
        assert ev["n"] == FAST["n_eval"] and 0 <= ev["accuracy"] <= 1 and ev["mean_tokens"] > 0
    rows = [json.loads(line) for line in (path / "test.jsonl").read_text().splitlines()]
    assert len(rows) == FAST["n_test"] and set(rows[0]) == {"question", "answer", "level", "uid"}
    _, test = tasks.make_splits(cfg.seed, cfg.n_train, cfg.n_test, cfg.levels)
    assert rows == tasks.rows(test)


def test_loads_with_auto_classes_and_template(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, path, _ = built
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.pad_token_id == tok.pad_token_id
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "x"}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nx<|im_end|>\n")
    # digits are single tokens; think tags are atomic and survive skip_special_tokens decoding
    ids = tok("12 + 345 = 357\n</think>", add_special_tokens=False)["input_ids"]
    assert [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)] == list("12345357")
    assert tok.convert_tokens_to_ids("</think>") in ids
    assert "</think>" in tok.decode(ids + [im_end], skip_special_tokens=True)
    with torch.no_grad():
        out = model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits
    assert out.shape[-1] >= len(tok) and torch.isfinite(out).all()


def test_cache_hit_does_not_rebuild(built, monkeypatch):
    cfg, cache, path, first_seconds = built
    mtime = os.path.getmtime(path / "model.safetensors")

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(embedded, "build_embedded_model", boom)
    assert get_embedded_model_path(EmbeddedModelConfig.tiny(**FAST), cache_dir=cache, progress=False) == path
    assert os.path.getmtime(path / "model.safetensors") == mtime


def test_summarize_hand_computed():
    recs = [
        {"level": 1, "tokens": 10, "truncated": False, "correct": True, "well_formed": True, "rechecks": 0},
        {"level": 1, "tokens": 30, "truncated": False, "correct": False, "well_formed": True, "rechecks": 2},
        {"level": 2, "tokens": 20, "truncated": True, "correct": True, "well_formed": False, "rechecks": 2},
        {"level": 2, "tokens": 40, "truncated": False, "correct": True, "well_formed": True, "rechecks": 3},
    ]
    s = embedded_build.summarize(recs)
    assert s["accuracy"] == 0.75 and s["well_formed"] == 0.75 and s["truncated"] == 0.25
    assert s["mean_tokens"] == 25.0 and s["max_tokens"] == 40 and s["frac_zero_rechecks"] == 0.25
    assert s["by_rechecks"]["2"] == {"frac": 0.5, "accuracy": 0.5, "mean_tokens": 25.0}
    assert s["by_level"]["2"] == {"n": 2, "accuracy": 1.0, "mean_tokens": 30.0}


def test_lr_schedule():
    cfg = EmbeddedModelConfig(sft_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert embedded_build._lr_at(0, cfg) == pytest.approx(1e-4)
    assert embedded_build._lr_at(9, cfg) == pytest.approx(1e-3)
    assert embedded_build._lr_at(10, cfg) == pytest.approx(1e-3)
    assert embedded_build._lr_at(100, cfg) == pytest.approx(1e-4)
    assert embedded_build._lr_at(55, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)


def test_build_is_deterministic_for_a_thread_count(built, tmp_path, monkeypatch):
    """Same config and thread count -> the same weights, bit for bit (the issue asks for a
    deterministic build for a seed). Another thread count gives the same model up to float
    summation order: bit-identical on some CPUs, up to ~1e-5 apart on others (AMX Xeon)."""
    from safetensors.torch import load_file

    cfg, _, path, _ = built
    monkeypatch.setenv("RLSPEC_BUILD_THREADS", str(embedded_build.build_threads()))
    embedded_build.build_embedded_model(cfg, tmp_path / "again", progress=False)
    monkeypatch.setenv("RLSPEC_BUILD_THREADS", "2" if embedded_build.build_threads() == 1 else "1")
    embedded_build.build_embedded_model(cfg, tmp_path / "other", progress=False)
    first = load_file(path / "model.safetensors")
    again, other = (load_file(tmp_path / d / "model.safetensors") for d in ("again", "other"))
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name
        torch.testing.assert_close(first[name], other[name], rtol=0, atol=1e-4)
    assert (path / "test.jsonl").read_text() == (tmp_path / "again" / "test.jsonl").read_text()


def test_build_threads_env(monkeypatch):
    monkeypatch.setenv("RLSPEC_BUILD_THREADS", "3")
    assert embedded_build.build_threads() == 3
    monkeypatch.setenv("RLSPEC_BUILD_THREADS", "zero")
    with pytest.raises(ConfigError, match="RLSPEC_BUILD_THREADS"):
        embedded_build.build_threads()
    monkeypatch.delenv("RLSPEC_BUILD_THREADS")
    assert 1 <= embedded_build.build_threads() <= 2


def test_mask_slips_shows_a_wrong_glance_but_never_teaches_it():
    """With mask_slips the SFT loss skips exactly the value of each slipped glance (its digits);
    right glances, the working-out and the corrected answer keep their labels. With
    taught_glance_levels=(1,) every glance above level 1 is masked too, right or wrong."""
    from rlspec.embedded_sft import sft_batches

    train, tok = _small_split_and_tokenizer()
    eos = tok.convert_tokens_to_ids(embedded_build.EOS_TOKEN)
    for taught in (tasks.ALL_LEVELS, (1,)):
        cfg = EmbeddedModelConfig.tiny(sft_steps=60, drill_frac=0.0, plain_frac=0.0, first_pass="glance",
                                       mask_slips=True, slip_rates=(0.5,) * 5, spiral_frac=0.0,
                                       taught_glance_levels=taught)
        count = {(ok, lvl == 1): 0 for ok in (True, False) for lvl in (1, 2)}
        for ids, labels in sft_batches(cfg, train, tok, eos):
            for row, lab in zip(ids, labels):
                start = int((lab != -100).nonzero()[0])  # the completion's first token
                end = int((row != tok.pad_token_id).sum())
                hidden = [i for i in range(start, end) if lab[i] == -100]
                text = tok.decode(row[start:end])
                question = tok.decode(row[:start]).split("user\n", 1)[1].split("\n", 1)[0]
                problem = next(p for p in train if p.question == question)
                value = text[slice(*tasks.glance_value_span(text))]
                count[value == problem.answer, problem.level == 1] += 1
                if value == problem.answer and problem.level in taught:
                    assert hidden == []
                else:
                    assert tok.decode(row[hidden]) == value  # the glance's value, and nothing else
        assert min(count.values()) > 10, count
    plain = EmbeddedModelConfig.tiny(sft_steps=40, drill_frac=0.0, plain_frac=0.5, first_pass="glance")
    texts = [tok.decode(row) for ids, _ in sft_batches(plain, train, tok, eos) for row in ids]
    assert sum("At a glance" not in t and "So " in t for t in texts) == len(texts) // 2  # the plain phase: steps
    with pytest.raises(ConfigError, match="first_pass='glance'"):
        EmbeddedModelConfig.tiny(mask_slips=True)
    assert EmbeddedModelConfig.tiny(first_pass="glance", mask_slips=True).cache_key() != \
        EmbeddedModelConfig.tiny(first_pass="glance").cache_key()
    with pytest.raises(ConfigError, match="mask_slips=True"):
        EmbeddedModelConfig.tiny(taught_glance_levels=(1,))
    with pytest.raises(ConfigError, match="taught_glance_levels must be levels"):
        EmbeddedModelConfig(taught_glance_levels=(0, 1))
    keyed = EmbeddedModelConfig(taught_glance_levels=(2, 1)).cache_key()
    assert keyed == EmbeddedModelConfig(taught_glance_levels=[1, 2]).cache_key() != EmbeddedModelConfig().cache_key()


def test_drill_by_op_gives_every_operation_an_equal_share_of_the_drills():
    """Uniform over facts, the few division facts are a small share of the drills; drawn operation
    first (drill_by_op), each of + - * / is about a quarter."""
    from rlspec.embedded_sft import sft_batches

    train, tok = _small_split_and_tokenizer()
    eos = tok.convert_tokens_to_ids(embedded_build.EOS_TOKEN)

    def division_share(**kw) -> float:
        cfg = EmbeddedModelConfig.tiny(sft_steps=100, drill_frac=0.5, **kw)
        ops = []
        for ids, _ in sft_batches(cfg, train, tok, eos):
            if "<think>" in tok.decode(ids[0]):  # a solution batch, not a drill
                continue
            for row in ids:  # a drill row: "a op b=c" facts, one per line
                ops += [op for line in tok.decode(row).split("\n") for op in "+-*/" if op in line]
        return ops.count("/") / len(ops)

    assert division_share() < 0.15  # 0.11 on this split
    assert 0.2 < division_share(drill_by_op=True) < 0.3


def test_drill_phrasings_drill_each_fact_in_the_phrasings_asked_for():
    """drill_phrasings=("=", " is "): about half the drilled lines read "a+b is c" (the glance's
    and the re-checks' phrasing), the rest "a+b=c"; the loss is on the result and the newline only."""
    from rlspec.embedded_sft import sft_batches

    train, tok = _small_split_and_tokenizer()
    eos = tok.convert_tokens_to_ids(embedded_build.EOS_TOKEN)
    results = {s.text() for p in train for s in p.steps}
    for phrasings in (("=",), ("=", " is ")):
        cfg = EmbeddedModelConfig.tiny(sft_steps=40, drill_frac=0.5, drill_phrasings=phrasings)
        count = {"=": 0, " is ": 0}
        half = cfg.drill_seq_len // 2
        for ids, labels in sft_batches(cfg, train, tok, eos):
            if "<think>" in tok.decode(ids[0]):  # a solution batch
                continue
            for row, lab in zip(ids, labels):
                lines = tok.decode(row[:half]).split("\n")[:-1]  # the last line may be cut
                taught = "".join(tok.decode([t]) if x != -100 else "|" for t, x in zip(row[:half], lab[:half]))
                for line, line_taught in zip(lines, taught.split("\n")):
                    sep = " is " if " is " in line else "="
                    lhs, result = line.split(sep)
                    assert f"{lhs}={result}" in results
                    assert line_taught.replace("|", "").strip() == result  # loss on the result only
                    count[sep] += 1
        if phrasings == ("=",):
            assert count[" is "] == 0
        else:
            assert 0.4 < count[" is "] / (count["="] + count[" is "]) < 0.6, count
    with pytest.raises(ConfigError, match="drill_phrasings must be"):
        EmbeddedModelConfig(drill_phrasings=("is",))
    assert EmbeddedModelConfig(drill_phrasings=("=", " is ")).cache_key() != EmbeddedModelConfig().cache_key()


def test_recheck_p0_by_level_sets_each_levels_share_of_answers_without_a_check():
    """recheck_p0_by_level: the later SFT solutions close after the first pass with the level's
    probability (level 1 always, level 5 never here); unset, every level uses recheck_p0."""
    from rlspec.embedded_sft import sft_batches

    train, tok = _small_split_and_tokenizer()
    eos = tok.convert_tokens_to_ids(embedded_build.EOS_TOKEN)
    level_of = {p.question: p.level for p in train}
    for by_level in ((), (1.0, 0.5, 0.5, 0.5, 0.0)):
        cfg = EmbeddedModelConfig.tiny(sft_steps=80, drill_frac=0.0, plain_frac=0.0, spiral_frac=0.0, budget_frac=0.0,
                                       l1_frac=0.0, first_pass="glance", recheck_p0=0.5,
                                       recheck_p0_by_level=by_level)
        closed = {lvl: [] for lvl in tasks.ALL_LEVELS}
        for ids, labels in sft_batches(cfg, train, tok, eos):
            for row, lab in zip(ids, labels):
                start = int((lab != -100).nonzero()[0])
                question = tok.decode(row[:start]).split("user\n", 1)[1].split("\n", 1)[0]
                closed[level_of[question]].append(tasks.count_rechecks(tok.decode(row[start:])) == 0)
        share = {lvl: sum(v) / len(v) for lvl, v in closed.items()}
        if by_level:
            assert share[1] == 1.0 and share[5] == 0.0 and 0.3 < share[3] < 0.7, share
        else:
            assert all(0.3 < x < 0.7 for x in share.values()), share
    with pytest.raises(ConfigError, match="recheck_p0_by_level"):
        EmbeddedModelConfig(recheck_p0_by_level=(0.5, 0.5))
    keyed = EmbeddedModelConfig(recheck_p0_by_level=(0.5, 0.3, 0.2, 0.1, 0.1)).cache_key()
    assert keyed != EmbeddedModelConfig().cache_key()


def test_glance_phrasing_is_checked_and_keyed():
    """glance_phrasing="=" (the default since version 7) writes the SFT glances as drilled facts
    ("At a glance, 3+5=8."); it must be a known phrasing, and the key tells the phrasings apart."""
    from rlspec.embedded_sft import sft_batches

    train, tok = _small_split_and_tokenizer()
    eos = tok.convert_tokens_to_ids(embedded_build.EOS_TOKEN)
    cfg = EmbeddedModelConfig.tiny(sft_steps=20, drill_frac=0.0, plain_frac=0.0, spiral_frac=0.0,
                                   first_pass="glance", glance_phrasing="=")
    glances = [t.split("At a glance, ")[1].split("\n")[0] for ids, _ in sft_batches(cfg, train, tok, eos)
               for t in (tok.decode(row) for row in ids)]
    assert glances and all(" is " not in g for g in glances)
    assert sum(g.startswith("x = ") for g in glances) < len(glances)  # levels 1-4 read "expr=value"
    with pytest.raises(ConfigError, match="glance_phrasing"):
        EmbeddedModelConfig(glance_phrasing="is")
    assert EmbeddedModelConfig(glance_phrasing="=").cache_key() == EmbeddedModelConfig().cache_key()  # the default
    assert EmbeddedModelConfig(glance_phrasing=" is ").cache_key() != EmbeddedModelConfig().cache_key()
