"""Input guards, checked where inputs are loaded, before anything is generated (issue 20 point 5).

* :func:`check_tokenizer` -- the tokenizer belongs to the model: it segments a normal question
  into several tokens (a model dir whose ``tokenizer.json`` is missing loads as a tokenizer with
  an empty vocabulary that encodes every prompt to nothing) and has no more tokens than the
  model's embedding has rows. Called by training, ``rlspec.eval`` and ``rlspec.export``.
* :func:`fit_prompts` -- every prompt leaves room for the response inside the model's positions:
  a longer one is an error naming the file and row (``data.overlong_prompts=error``) or is
  dropped with a count (``drop``). A 100k-character question fails here in seconds instead of
  decoding for minutes on a context the model was never trained for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rlspec.data import DATA_SUFFIXES
from rlspec.errors import DataError, ModelLoadError

PROBE = "What is 12 + 35? Please reason step by step."  # any working tokenizer needs several tokens
MIN_PROBE_TOKENS = 4


def check_tokenizer(tokenizer: Any, model: Any, where: str | Path) -> None:
    """Raise :class:`ModelLoadError` naming ``where`` (the model or checkpoint dir) when
    ``tokenizer`` cannot be the model's: a missing/empty vocabulary, or more tokens than the
    model's embedding rows."""
    size = len(tokenizer)
    ids = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if len(ids) < MIN_PROBE_TOKENS:
        missing = Path(str(where), "tokenizer.json")
        hint = (f"{missing} is missing; copy the tokenizer files (tokenizer.json, tokenizer_config.json) of the "
                f"model it came from into {where}" if Path(str(where)).is_dir() and not missing.is_file()
                else f"give {where} the tokenizer of the model it came from")
        raise ModelLoadError(f"the tokenizer of {where} has {size} tokens and encodes a {len(PROBE)}-character "
                             f"question as {len(ids)}: its vocabulary is missing or broken ({hint})")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if rows is not None and (size > rows or max(ids) >= rows):
        raise ModelLoadError(f"the tokenizer of {where} has {size} tokens but the model's embedding has {rows} rows: "
                             f"they do not belong together; give {where} the tokenizer of the model it came from")


def model_positions(model: Any) -> int | None:
    """The model's positions (``max_position_embeddings``, times a RoPE scaling factor such as
    YaRN's when the config keeps the original length there, as Qwen2.5's long-context setup does),
    or None when its config has none."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not positions:
        return None
    scaling = getattr(config, "rope_scaling", None) or {}
    factor = float(scaling.get("factor") or 1.0) if isinstance(scaling, dict) else 1.0
    original = scaling.get("original_max_position_embeddings") if isinstance(scaling, dict) else None
    if factor > 1 and (original is None or int(original) == int(positions)):
        return int(positions * factor)
    return int(positions)


def fit_prompts(rows: Sequence[dict[str, Any]], prompt_ids: Sequence[Sequence[int]], positions: int | None,
                response_length: int, response_key: str, source: str,
                mode: str = "error") -> tuple[list[dict[str, Any]], list[list[int]]]:
    """``(rows, prompt_ids)`` whose prompts fit ``positions - response_length`` tokens.

    ``mode`` is ``data.overlong_prompts``: ``error`` raises :class:`DataError` naming ``source``,
    the first overlong row and the count; ``drop`` drops them and prints the count (all of them
    overlong is still an error); ``off`` keeps everything (a model that extrapolates past its
    positions). ``positions=None`` (unknown) keeps everything.
    """
    rows, prompt_ids = list(rows), [list(p) for p in prompt_ids]
    if positions is None or mode == "off":
        return rows, prompt_ids
    limit = positions - response_length
    over = [i for i, p in enumerate(prompt_ids) if len(p) > limit]
    if not over:
        return rows, prompt_ids
    room = f"the model's {positions} positions minus {response_key}={response_length}"
    if limit <= 0:
        raise DataError(f"{response_key}={response_length} leaves no room for a prompt in the model's {positions} "
                        f"positions; lower {response_key} (or data.overlong_prompts=off for a model that "
                        f"extrapolates past its positions)")
    if mode == "error" or len(over) == len(rows):
        first = over[0]
        more = f" ({len(over) - 1} more rows too)" if len(over) > 1 else ""
        fix = ("shorten the prompts or lower " + response_key if len(over) == len(rows) else
               f"shorten it, lower {response_key}, or set data.overlong_prompts=drop to skip such rows")
        raise DataError(f"{source}: row {first} is a prompt of {len(prompt_ids[first])} tokens, longer than {room} "
                        f"({limit} tokens){more}; {fix}")
    print(f"data.overlong_prompts=drop: dropped {len(over)} of {len(rows)} rows of {source} whose prompt is longer "
          f"than {room} ({limit} tokens)")
    keep = sorted(set(range(len(rows))) - set(over))
    return [rows[i] for i in keep], [prompt_ids[i] for i in keep]


def source_description(source: str | Path, split: str) -> str:
    """How messages name a data source: its file (a directory's ``{split}`` file), or ``id[split]``."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        found = [path / f"{split}{suffix}" for suffix in DATA_SUFFIXES if (path / f"{split}{suffix}").is_file()]
        return str(found[0]) if found else str(path)
    return str(path) if path.is_file() else f"{source}[{split}]"
