"""Prompt templates (``data.prompt_template``): how a question becomes the text the model continues.

* ``chat`` (default) -- the tokenizer's chat template, the question and the instruction as one user
  turn, generation prompt included (instruct and reasoning models);
* ``r1_zero`` -- DeepSeek-R1-Zero's plain template for *base* models (zero-RL): the text of
  DeepSeek-R1 (arXiv 2501.12948, Table 1) laid out as Open-Reasoner-Zero and SimpleRL-Zoo lay it
  out for training ("\\nUser: ...\\nAssistant: <think>": the assistant turn opens with
  ``<think>``, so the model starts thinking at once);
* ``plain`` -- the question and the instruction, then a new line;
* any other string containing ``{question}`` -- a template of your own.

In every template ``{question}`` stands for the user turn: the question followed by
``data.instruction`` (a new line between them; ``data.instruction=''`` leaves the bare question),
exactly what the chat template's user message holds. Only ``{question}`` is substituted, so other
braces (``\\boxed{}``) stay as written. Plain templates are tokenized with the tokenizer's special
tokens (a base model's BOS, as in pretraining); the chat template writes its own.
"""

from __future__ import annotations

from rlspec.errors import ConfigError

KEY = "data.prompt_template"
PLACEHOLDER = "{question}"
R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>"
)
NAMED_TEMPLATES = {"r1_zero": R1_ZERO, "plain": "{question}\n"}


def check_prompt_template(value: str, key: str = KEY) -> None:
    """``chat``, a named template or a string with ``{question}``; anything else raises ConfigError."""
    if value == "chat" or value in NAMED_TEMPLATES or (isinstance(value, str) and PLACEHOLDER in value):
        return
    raise ConfigError(f"{key}={value!r} is neither chat, a named template ({', '.join(NAMED_TEMPLATES)}) nor a "
                      f"string containing {PLACEHOLDER} (quote it on the command line: {key}='Q: {PLACEHOLDER} A:')")


def template_text(value: str) -> str | None:
    """The plain template of ``value`` (``None`` for ``chat``: the tokenizer's chat template)."""
    check_prompt_template(value)
    return None if value == "chat" else NAMED_TEMPLATES.get(value, value)


def user_content(question: str, instruction: str | None) -> str:
    """The user turn: the question followed by the instruction (when there is one)."""
    return f"{question}\n{instruction}" if instruction else question


def fill(template: str, question: str, instruction: str | None) -> str:
    """A plain template with ``{question}`` replaced by the user turn.

    >>> fill("Q: {question}\\nA: \\\\boxed{}", "1+1?", "Think.")
    'Q: 1+1?\\nThink.\\nA: \\\\boxed{}'
    """
    return template.replace(PLACEHOLDER, user_content(question, instruction))
