r"""The one answer grader, shared by the training rewards and the evaluation.

Protocol (efficient-reasoning.md Sec. 6; the DeepScaleR/rLLM grader used by DLER and HBPO):

1. :func:`extract_final_answer` -- keep the text after the last ``</think>`` (a response with
   no ``</think>`` is ungradable when ``require_think_close``), then take the content of the
   **last** ``\boxed{...}`` / ``\fbox{...}`` / ``\boxed x``, matching nested braces.
2. :func:`grade` -- if the answer and the gold are both plain numbers (``25``, ``025``,
   ``1,000``, ``-3.50``, ``7/2``, ``\frac{7}{2}``, ``10\%``) compare them exactly as
   :class:`fractions.Fraction`; otherwise ask math-verify (``parse`` + ``verify``). math-verify
   grades a relation ``lhs = rhs`` (also ``==``, ``:=``, ``\approx``, ``\equiv``) by its right-hand
   side, so ``\boxed{2+2=5}`` would match ``5``: against a gold that is not itself a relation, a
   boxed relation is an answer only as ``name = value`` (:func:`relation_is_answer`).

math-verify's own timeouts use ``signal.alarm`` and raise outside the main thread, so it is
always called with its timeouts off and the time limit is enforced here:

* in the main thread, a ``SIGALRM`` interval timer (float seconds) around parse + verify;
* in any other thread (a grading thread pool, an async trainer), a long-lived helper process
  that runs the same guarded check and is killed if it does not answer in time.

A timeout counts as incorrect. Nothing that a model can write makes :func:`grade` raise.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose argument starts at ``text[start:]`` (just after ``\\boxed``)."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        j = i
        while j < len(text):
            ch = text[j]
            if ch == "\\":  # \{ \} \\ are literal characters, not group delimiters
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None  # unbalanced: the box never closes (e.g. cut off by the length limit)
    if i == start:  # "\boxed5" or "\boxed" at the very end: not a box
        return None
    # "\boxed 42$" (LaTeX's brace-less argument form): one whitespace-delimited token.
    match = re.match(r"[^\s$]+", text[i:])
    return match.group(0).rstrip(".,;:") if match else None


_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_answer(text: str, *, require_think_close: bool = False, last_number_fallback: bool = False) -> str | None:
    r"""The model's final answer: the content of the last box after the last ``</think>``.

    * With a ``</think>`` only the text after the last one is searched. Without one the whole
      text is searched, or ``None`` is returned when ``require_think_close`` (DeepScaleR's rule:
      a response that never closed its thinking has no answer).
    * The last ``\boxed{...}`` or ``\fbox{...}`` wins; nested braces are matched and
      ``\{``/``\}`` are literal. ``\boxed 42`` (no braces) gives the next token.
    * If that last box is unbalanced (``\boxed{12`` at a length cut) or empty, the answer is
      ``None``: earlier boxes are *not* used, because they are not the final answer.
    * ``last_number_fallback`` (GSM8K's convention, as in lm-eval-harness' flexible extract):
      with no box at all, the last number of the (post-``</think>``) text is the answer; text
      from an unclosed ``<think>`` on is reasoning cut off, not an answer, and is ignored.

    >>> extract_final_answer("<think>2+2</think> so \\boxed{3} no, \\boxed{\\frac{8}{2}}.")
    '\\frac{8}{2}'
    >>> extract_final_answer("\\boxed{4}", require_think_close=True) is None
    True
    """
    if not isinstance(text, str):
        return None
    cut = text.rfind(THINK_CLOSE)
    if cut >= 0:
        text = text[cut + len(THINK_CLOSE) :]
    elif require_think_close:
        return None
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        if last_number_fallback:
            opened = text.find(THINK_OPEN)  # after the last </think>, any <think> is unclosed
            numbers = _LAST_NUMBER_RE.findall(text if opened < 0 else text[:opened])
            return numbers[-1].rstrip(",").replace(",", "") if numbers else None
        return None
    content = _box_content(text, last.end())
    if content is None:
        return None
    content = content.strip()
    return content or None


# ----------------------------------------------------------------------------------------------
# Fast path: plain numbers
# ----------------------------------------------------------------------------------------------

_DECIMAL_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_RATIO_RE = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac(?:\{\s*([+-]?\d+)\s*\}\{\s*(\d+)\s*\}|(\d)(\d))")
# Decorations that never change a number's value: $...$, a leading \$, a trailing percent or
# degree sign (as in the mathd normalisation that DLER OR-combines with math-verify).
_NUMBER_SUFFIXES = ("\\%", "%", "^{\\circ}", "^\\circ", "\\circ", "°")


def as_plain_number(text: str) -> Fraction | None:
    r"""``text`` as an exact number if it is a plain one, else ``None``.

    Plain means an integer or decimal (optional sign, leading zeros, ``,``/``{,}``/``\,``
    thousands separators in groups of three, trailing ``.0``), a ratio ``a/b`` or ``\frac{a}{b}``
    (also ``\dfrac``, ``\tfrac``, ``\frac12``) of integers, optionally wrapped in ``$`` and
    decorated with a leading ``\$`` or a trailing ``%`` / degree sign. ``1,2`` is *not* a
    number (it is a pair).

    >>> as_plain_number("1{,}000.50"), as_plain_number("025"), as_plain_number("-\\frac{6}{4}")
    (Fraction(2001, 2), Fraction(25, 1), Fraction(-3, 2))
    """
    s = text.strip().strip("$").strip()
    # "{,}" and a thin space "\," between digit groups are thousands separators ("1\,000");
    # they must still come in groups of three to match (so "1\,2" stays not-a-number).
    s = s.replace("{,}", ",").replace("\\!", "").replace("\u2212", "-")
    s = re.sub(r"(?<=\d)\\,(?=\d{3}(?!\d))", ",", s)
    if s.startswith("\\$"):
        s = s[2:].lstrip()
    for suffix in _NUMBER_SUFFIXES:
        if s.endswith(suffix):
            s = s[: -len(suffix)].rstrip()
            break
    if len(s) > 64:  # never hand a huge digit string to Fraction
        return None
    if _DECIMAL_RE.fullmatch(s):
        return Fraction(s.replace(",", "").rstrip("."))
    match = _RATIO_RE.fullmatch(s) or _LATEX_FRAC_RE.fullmatch(s)
    if match is None:
        return None
    if match.re is _RATIO_RE:
        num, den = int(match.group(1)), int(match.group(2))
    else:
        sign = -1 if match.group(1) == "-" else 1
        num = sign * int(match.group(2) if match.group(2) is not None else match.group(4))
        den = int(match.group(3) if match.group(3) is not None else match.group(5))
    return Fraction(num, den) if den != 0 else None


# ----------------------------------------------------------------------------------------------
# Boxed relations
# ----------------------------------------------------------------------------------------------

# relations math-verify reduces to their right-hand side ("<=", ">=", "!=" are not among them)
_EQ_RELATION_RE = re.compile(r"==|:=|(?<![<>!:=])=(?!=)|\\(?:approx|equiv|simeq|doteq|coloneqq)(?![A-Za-z])")
_CLAUSE_SEP_RE = re.compile(r"[,;]|\\\\|\\q?quad(?![A-Za-z])|\\(?:text|textrm|mathrm|mbox)\{\s*(?:or|and)\s*\}"
                            r"|(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])")  # "x = 1, y = 2", "x = 2 \text{ or } 3"
_TOKEN_RE = re.compile(r"\\[{}]|\\[A-Za-z]+|\\.|.", re.S)
_SPACING_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?|displaystyle)(?![A-Za-z])|\\[,;:! ]|\$")
_GREEK = ("alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|rho|varrho|"
          "sigma|varsigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Sigma|Phi|Psi|Omega")  # no \pi
_ATOM = (rf"(?:[A-Za-z]|\\(?:{_GREEK}|angle|measuredangle|triangle)(?![A-Za-z])"
         r"|\\(?:text|textrm|textit|textbf|mathrm|mathit|mathbf|operatorname)\{[A-Za-z ]+\}"
         r"|\\(?:hat|bar|overline|underline|vec|tilde|widehat|widetilde|overrightarrow|dot|ddot)\s*"
         r"(?:\{[A-Za-z\\ ]+\}|[A-Za-z]))")
_NAME_RE = re.compile(rf"\s*(?:{_ATOM}(?:_(?:[A-Za-z0-9]|\{{[A-Za-z0-9, ]+\}})|'|\^\{{?(?:\*|\\prime)\}}?)*\s*)+")


def _tokens(text: str) -> list[tuple[int, int]]:
    r"""``(start, depth change)`` per token: ``( [ { \{`` open, ``) ] } \}`` close (mixed: ``[1, 2)``)."""
    return [(m.start(), 1 if m.group() in ("(", "[", "{", "\\{") else -1 if m.group() in (")", "]", "}", "\\}") else 0)
            for m in _TOKEN_RE.finditer(text)]


def _split_top(text: str, pattern: re.Pattern[str]) -> tuple[list[str], int]:
    """``text`` split at the matches of ``pattern`` outside any bracket, and how many there were."""
    pieces, depth, skip, last = [], 0, 0, 0
    for start, delta in _tokens(text):
        if start < skip:
            continue
        match = pattern.match(text, start) if depth == 0 else None
        if match and match.end() > start:
            pieces.append(text[last:start])
            skip = last = match.end()
            continue
        depth = max(depth + delta, 0)
    return pieces + [text[last:]], len(pieces)


def _unwrap(text: str) -> str | None:
    r"""The inside of ``text`` when it is one bracket group (``(x, y)``, ``\{...\}``), else None."""
    tokens, depth = _tokens(text), 0
    for k, (start, delta) in enumerate(tokens):
        depth += delta
        if depth <= 0:
            return text[tokens[1][0]:start] if 0 < k == len(tokens) - 1 else None
    return None


def _is_name(text: str) -> bool:
    r"""A lone variable (``x``, ``y_1``, ``\theta``, ``\overline{AB}``, ``f(x)``, ``p(2)``) or a tuple (``(x, y)``)."""
    text = text.strip()
    inner = _unwrap(text)
    if inner is not None:
        return all(_is_name(part) for part in _split_top(inner, re.compile(","))[0])
    if text.endswith(")"):  # f(x): a name applied to names or numbers
        depth, opened = 0, -1
        for start, delta in _tokens(text):
            if delta == 1 and depth == 0:
                opened = start
            depth = max(depth + delta, 0)
        if opened > 0:
            args = _split_top(text[opened + 1 : -1], re.compile(","))[0]
            return _is_name(text[:opened]) and all(_is_name(a) or as_plain_number(a) is not None for a in args)
    return 0 < len(text) <= 200 and _NAME_RE.fullmatch(text) is not None


def relation_is_answer(answer: str, depth: int = 0) -> bool:
    r"""Whether a boxed answer with relations (``=``, ``==``, ``:=``, ``\approx``, ``\equiv``) states
    values: each clause (split at ``,`` ``;`` ``\text{ or }`` ...) has at most one relation, its left
    side a lone variable (:func:`_is_name`). Not ``2+2=5``, ``3=4``, ``a=b=5``, ``2x=10``, ``(2+2=5)``.

    >>> relation_is_answer("y = 5"), relation_is_answer("(x, y) = (1, 2)"), relation_is_answer("2+2=5")
    (True, True, False)
    """
    if depth > 8:  # nested deeper is no answer (and the work stays linear in the answer's length)
        return False
    text = _SPACING_RE.sub(" ", answer).strip()
    inner = _unwrap(text)
    if inner is not None:
        return relation_is_answer(inner, depth + 1)
    clauses, count = _split_top(text, _CLAUSE_SEP_RE)
    if count:
        return all(relation_is_answer(c, depth + 1) for c in clauses)
    sides, relations = _split_top(text, _EQ_RELATION_RE)
    if relations == 0:  # none at the top level: one inside brackets, as in 2(x=3), is no answer
        return _EQ_RELATION_RE.search(text) is None
    return relations == 1 and _is_name(sides[0])


# ----------------------------------------------------------------------------------------------
# Slow path: math-verify under a time limit
# ----------------------------------------------------------------------------------------------


class _GradeTimeout(BaseException):
    """Raised by the SIGALRM handler. A BaseException so that sympy's ``except Exception``
    blocks cannot swallow it."""


class _SilenceTimeoutWarning(logging.Filter):
    # math-verify warns once that its timeouts are off; here they are off on purpose.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_math_verify: Any = None


def _load_math_verify() -> Any:
    global _math_verify
    if _math_verify is None:
        import math_verify  # imported lazily: sympy costs ~1 s and integer answers never need it

        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_SilenceTimeoutWarning())
        _math_verify = math_verify
    return _math_verify


def _boxed(s: str) -> str:
    return s if "\\boxed" in s else f"$\\boxed{{{s}}}$"


def _math_verify_equal(answer: str, gold: str) -> bool:
    """math-verify's verdict, no time limit (the callers add one). Never raises ``Exception``."""
    mv = _load_math_verify()
    try:
        # math-verify 0.9 parses \emptyset but not its variant \varnothing
        answer, gold = (t.replace("\\varnothing", "\\emptyset") for t in (answer, gold))
        gold_parsed = mv.parse(_boxed(gold), parsing_timeout=None)
        answer_parsed = mv.parse(_boxed(answer), parsing_timeout=None)
        if not gold_parsed or not answer_parsed:
            return False
        return bool(mv.verify(gold_parsed, answer_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001 -- weird model output must never crash training
        logger.debug("math-verify failed on answer %.200r vs gold %.200r", answer, gold, exc_info=True)
        return False


def _signal_timer_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


_FINALIZER_NAMES = frozenset({"__del__", "unraisable_hook", "_remove", "tracemalloc_message"})


def _in_finalizer(frame: Any) -> bool:
    """Whether the interrupted code runs inside a finalizer or an unraisable-exception hook."""
    while frame is not None:
        if frame.f_code.co_name in _FINALIZER_NAMES:
            return True
        frame = frame.f_back
    return False


def _verify_with_alarm(answer: str, gold: str, timeout_s: float) -> bool | None:
    """math-verify under a SIGALRM interval timer; ``None`` on timeout. Main thread only.

    The timer re-fires every 50 ms until disarmed, so a bare ``except:`` deep in sympy cannot
    swallow the timeout for good. An outer interval timer (e.g. pytest-timeout's) is honoured:
    ours never outlives it, and its remaining time is re-armed afterwards.
    """
    armed = True

    def on_alarm(signum: int, frame: Any) -> None:
        # never raise inside a finalizer (__del__, an unraisable-exception hook): Python would only
        # report it as "Exception ignored" and carry on; the timer re-fires in 50 ms anyway
        if armed and not _in_finalizer(frame):
            raise _GradeTimeout

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    delay = min(timeout_s, outer_delay) if outer_delay > 0 else timeout_s
    started = time.monotonic()
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, max(delay, 1e-3), 0.05)
            return _math_verify_equal(answer, gold)
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _GradeTimeout:
        return None
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if outer_delay > 0:
            remaining = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), outer_interval)


class _WorkerUnavailable(RuntimeError):
    pass


class _VerifyWorker:
    """A helper process that grades with the SIGALRM guard in *its* main thread.

    Used from non-main threads, where signals cannot be used. Requests are serialised by a lock.
    The child enforces the time limit itself (cheap, the process survives); if it does not answer
    within a further second (a hang the signal cannot interrupt, or a crash) it is killed and a
    fresh one starts on the next request. Protocol: one JSON line per request on stdin, one line
    ``1``/``0``/``t`` (timeout) per answer on the child's original stdout.
    """

    startup_timeout_s = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buffer = b""

    def _start(self) -> subprocess.Popen:
        # Load this file by path so the child skips rlspec/__init__ chains (and their torch import).
        bootstrap = (
            "import importlib.util as u; "
            f"s = u.spec_from_file_location('_rlspec_grader_worker', {str(Path(__file__).resolve())!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m._serve_worker()"
        )
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.Popen(
            [sys.executable, "-c", bootstrap], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self._proc, self._buffer = proc, b""
        if self._read_line(time.monotonic() + self.startup_timeout_s) != "ready":
            self.stop()
            raise _WorkerUnavailable("the grading helper process did not start")
        return proc

    def _read_line(self, deadline: float) -> str | None:
        """One line from the child, or ``None`` at the deadline or if the child died."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # EOF: the child exited
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def verify(self, answer: str, gold: str, timeout_s: float, kill_after_s: float | None = None) -> bool | None:
        """The child's verdict, ``None`` on a timeout. The child gives up after ``timeout_s``; it is
        killed if no answer arrives after ``kill_after_s`` (default ``timeout_s + 1``)."""
        with self._lock:
            proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
            assert proc.stdin is not None
            try:
                proc.stdin.write((json.dumps({"a": answer, "g": gold, "t": timeout_s}) + "\n").encode())
                proc.stdin.flush()
            except OSError:
                self.stop()
                return None
            kill_after_s = timeout_s + 1.0 if kill_after_s is None else kill_after_s
            reply = self._read_line(time.monotonic() + kill_after_s)
            if reply is None:  # hung beyond the signal's reach, or died (e.g. out of memory)
                self.stop()
                return None
            return {"1": True, "0": False}.get(reply)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def _serve_worker() -> None:
    """Main loop of the helper process started by :class:`_VerifyWorker`."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from sympy & co. go to stderr, not into the protocol
    _load_math_verify()
    _verify_with_alarm("\\frac{1}{2}", "0.5", 30.0)  # warm sympy's caches before saying ready
    replies.write("ready\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            verdict = _verify_with_alarm(str(request["a"]), str(request["g"]), float(request["t"]))
        except Exception:  # noqa: BLE001
            verdict = False
        replies.write({True: "1", False: "0", None: "t"}[verdict] + "\n")


_WORKER = _VerifyWorker()
_WORKER_FAILED = False


def _reset_worker_after_fork() -> None:
    # A forked child (e.g. a DataLoader worker) must not share the parent's pipes or lock.
    global _WORKER
    _WORKER = _VerifyWorker()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_worker_after_fork)


def _stop_worker_at_exit() -> None:
    _WORKER.stop()


atexit.register(_stop_worker_at_exit)


def _verify_in_thread(answer: str, gold: str, timeout_s: float) -> bool | None:
    global _WORKER_FAILED
    if not _WORKER_FAILED and hasattr(select, "select") and os.name == "posix":
        try:
            return _WORKER.verify(answer, gold, timeout_s)
        except (_WorkerUnavailable, OSError) as err:
            _WORKER_FAILED = True
            logger.warning("grader: %s (%s); grading in this thread WITHOUT a time limit", err, type(err).__name__)
    return _math_verify_equal(answer, gold)


# Verdicts by (answer, gold): True/False, or the timeout (float seconds) a check ran out of.
# Groups of rollouts repeat the same final answer a lot, so this saves most math-verify calls.
_RESULT_CACHE: dict[tuple[str, str], bool | float] = {}
_RESULT_CACHE_MAX = 100_000


def _slow_equal(answer: str, gold: str, timeout_s: float) -> bool:
    key = (answer, gold)
    cached = _RESULT_CACHE.get(key)
    if isinstance(cached, bool):
        return cached
    if cached is not None and timeout_s <= cached:
        return False  # timed out before with at least this much time
    if _signal_timer_usable():
        verdict = _verify_with_alarm(answer, gold, timeout_s)
    else:
        verdict = _verify_in_thread(answer, gold, timeout_s)
    if len(_RESULT_CACHE) >= _RESULT_CACHE_MAX:
        _RESULT_CACHE.clear()
    if verdict is None:
        logger.warning(
            "grader: checking answer %.80r against gold %.80r took over %.1f s; counted as incorrect",
            answer, gold, timeout_s,
        )
        _RESULT_CACHE[key] = timeout_s
        return False
    _RESULT_CACHE[key] = verdict
    return verdict


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _gold_text(gold: Any) -> str | None:
    if gold is None or (isinstance(gold, float) and not math.isfinite(gold)):
        return None
    text = str(gold).strip()
    if any(cmd in text for cmd in _BOX_COMMANDS):  # a gold written as "\boxed{...}" or a solution
        text = extract_final_answer(text) or text
    return text or None


def grade(response: str, gold: str, *, require_think_close: bool = False, timeout_s: float = 5.0,
          last_number_fallback: bool = False) -> bool:
    r"""Whether ``response``'s final answer equals ``gold`` (see the module docstring).

    Args:
        response: the generated text (the completion only, not the prompt).
        gold: the reference answer, e.g. ``"25"``, ``"\frac{1}{2}"`` or ``"\boxed{(1, 2)}"``.
        require_think_close: a response without ``</think>`` is incorrect (DeepScaleR/DLER).
        timeout_s: time limit for one math-verify check; a timeout counts as incorrect.
        last_number_fallback: with no ``\boxed{}``, grade the last number instead (GSM8K's
            convention, ``reward.last_number_fallback``; see :func:`extract_final_answer`).

    Returns ``False`` for anything ungradable (no box, empty or unbalanced box, no gold, ...).

    >>> grade("<think>...</think> The answer is \\boxed{025}.", "25")
    True
    >>> grade("\\boxed{\\dfrac{1}{2}}", "0.5"), grade("\\boxed{1,000}", "1000")
    (True, True)
    """
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(
            f"grader timeout_s must be a finite number of seconds > 0, got {timeout_s!r} (reward.grader_timeout_s)"
        )
    answer = extract_final_answer(response, require_think_close=require_think_close,
                                  last_number_fallback=last_number_fallback)
    gold_text = _gold_text(gold)
    if answer is None or gold_text is None:
        return False
    try:
        if _EQ_RELATION_RE.search(answer) and not _EQ_RELATION_RE.search(gold_text) and not relation_is_answer(answer):
            return False  # "2+2=5" is not the answer 5
        answer_number, gold_number = as_plain_number(answer), as_plain_number(gold_text)
        if answer_number is not None and gold_number is not None:
            return answer_number == gold_number
        return _slow_equal(answer, gold_text, float(timeout_s))
    except Exception:  # noqa: BLE001 -- weird model output must never crash training
        logger.debug("grader failed on answer %.200r vs gold %.200r", answer, gold_text, exc_info=True)
        return False


def grade_batch(
    responses: Sequence[str], golds: Sequence[str], *, require_think_close: bool = False, timeout_s: float = 5.0,
    last_number_fallback: bool = False,
) -> list[bool]:
    """:func:`grade` for each ``(response, gold)`` pair, in order."""
    if len(responses) != len(golds):
        raise ValueError(f"grade_batch got {len(responses)} responses but {len(golds)} gold answers")
    return [grade(r, g, require_think_close=require_think_close, timeout_s=timeout_s,
                  last_number_fallback=last_number_fallback) for r, g in zip(responses, golds)]
