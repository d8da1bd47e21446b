"""GSM8K as training data (``data.path=.../gsm8k``): the gold answer is the part after ``#### ``,
as ``rlspec.eval``'s gsm8k benchmark reads it; the whole worked solution graded every answer wrong
(and took the grader's 5 s timeout per answer)."""

import json

from rlspec.data import load_split
from rlspec.rewards.grader import grade

ROW = {"question": "Janet's ducks lay 16 eggs ... How much does she make?",
       "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"}


def test_gsm8k_answer_column_becomes_its_final_answer(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({"question": "q", "answer": "#### 5"}) + "\n")
    rows = load_split(str(tmp_path), "train")
    assert [r["answer"] for r in rows] == ["1018", "#### 5"]  # no solution before the mark: left as it is
    assert grade("so the answer is \\boxed{1018}", rows[0]["answer"], timeout_s=5.0)
    assert not grade("so the answer is \\boxed{18}", rows[0]["answer"], timeout_s=5.0)
