"""Synthetic long-context tasks that follow NVIDIA RULER (Hsieh et al., 2024), generated from code.

Every sample is a pure function of ``(task, length, seed, index)`` and the tokenizer: the same
arguments give the same prompt on any machine. Lengths are counted in the model's own tokens, chat
template and answer prefix included; a prompt lands within 2% under the requested length (the filler
is cut whole units at a time; the unit count is found by interpolating the real token count).

What RULER specifies and this module follows (RULER's ``scripts/synthetic.yaml``,
``scripts/data/synthetic/{constants,niah,variable_tracking,common_words_extraction,
freq_words_extraction}.py``, ``scripts/eval/synthetic/constants.py``, read 2026-12-04):

- Each task has a template (the user message) and an **answer prefix** that RULER appends after the
  chat template's assistant header, so the model continues it (``...assistant\\n The special magic
  number for X mentioned in the provided text is``). Here the prefix is :attr:`Sample.answer_prefix`;
  :func:`trimix_probe.models.encode_prompt` appends it after the generation prompt, in eval, probe,
  verification and recall alike. The prediction scored is the continuation after it.
- ``niah_single_noise`` (RULER ``niah_single_1``): one needle ``One of the special magic numbers for
  {key} is: {value}.`` (key an adjective-noun pair, value a 7-digit number) at a uniformly random
  position among copies of the noise unit ``The grass is green. ... There and back again.``, one
  copy a line. Single-answer templates say "A special magic number is ... What is ..." (RULER
  rewrites Some/are/numbers for one answer).
- ``niah_single_prose`` (``niah_single_2``): the same needle in prose, at a depth drawn from RULER's
  40 depths (0, 3, ..., 100 %) at a sentence boundary. RULER uses Paul Graham's essays, a download;
  the prose here is generated (:func:`_prose_sentence`).
- ``niah_multikey`` (``niah_multikey_2``): the haystack is needles of other keys, one a line (the
  last line may hold a few noise sentences, so short prompts land within 2%).
- ``niah_multivalue``: one key with 4 values in prose (4 distinct depths); all 4 asked for.
- ``niah_multiquery``: 4 keys with one value each in prose; all 4 asked for, in a random order.
- ``vt`` (variable tracking): one chain ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE`` ... (4
  hops, 5-letter names, 5-digit value), statements in order at random lines of the noise haystack;
  preceded by one solved example (3-letter names, a short noise haystack: RULER's ~500 tokens,
  fewer below 4K, none below 1K so short prompts fit) whose answer lists the names.
- ``cwe`` (common words): a numbered list where 10 words appear 30 times and the others 3 times
  (below 4K: 6 and 1), after one solved example of 40 words (10 x 10, 30 x 3; below 4K: 20 words,
  3 x 1); asks for the 10 most common. RULER's words are English (wonderwords); here they are
  pronounceable generated words (:func:`_syllable_words`), since no word list ships here.
- ``fwe`` (frequent words): coded 6-letter words with counts ``floor(N k^-2 / zeta(2))`` for rank
  ``k`` over a vocabulary of ``length // 50``; rank 1 is ``...`` (noise); asks for ranks 2-4.

Tokens to generate (RULER): niah 128, vt 30, cwe 120, fwe 50. Scoring: ``string_match_all`` (the
fraction of gold answers found in the prediction, case folded) for every built-in task and for a
user JSONL (:func:`load_jsonl`); :func:`string_match_part` (any gold answer found) is RULER's QA
metric, kept for completeness. QA (SQuAD / HotpotQA) is left out: no public QA dataset ships here.

Not followed: RULER counts ``prompt + tokens to generate`` against the length; here the prompt
alone (chat template and answer prefix included) is fit to the length. RULER fixes its shuffles
with the run's seed; here every draw comes from the sample's own seed.

Not verified: tokenizers other than SmolLM2's and Qwen2.5's (any Hugging Face tokenizer should
work; lengths are checked against the tokenizer actually used).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InputError

JSONL_TASK = "jsonl"
"""Task name of samples read from a user file (scored with ``string_match_all``)."""

LENGTH_TOLERANCE = 0.02


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str                  # the user message text (no chat template applied)
    answers: tuple[str, ...]     # gold answers
    answer_text: str             # gold continuation after answer_prefix, used as the probe objective
    n_tokens: int                # prompt length in the model's tokens, template and prefix included (0: not counted)
    answer_prefix: str = ""      # what the model sees after the template's generation prompt (RULER's answer prefix)


# ---------------------------------------------------------------------------------------- word lists
_ADJ = ("ancient", "bitter", "bright", "calm", "careful", "clever", "cold", "curious", "dark", "distant",
        "eager", "empty", "fragile", "gentle", "golden", "hidden", "hollow", "honest", "humble", "icy",
        "idle", "loud", "lucky", "modern", "narrow", "noble", "old", "pale", "patient", "proud", "quiet",
        "rapid", "rare", "rough", "rusty", "sharp", "shy", "silent", "silver", "simple", "slow", "small",
        "smooth", "soft", "steady", "strange", "sudden", "swift", "tall", "tender", "tiny", "vast", "warm",
        "wary", "wild", "wise", "young", "zealous", "crimson", "frozen")
_NOUN = ("anchor", "apple", "arrow", "badge", "barn", "basket", "beacon", "bell", "bridge", "brook",
         "cabin", "candle", "canyon", "castle", "cellar", "chair", "cliff", "clock", "cloud", "comet",
         "compass", "copper", "desert", "engine", "falcon", "feather", "fern", "forest", "fountain",
         "garden", "glacier", "harbor", "hammer", "harvest", "island", "kettle", "ladder", "lantern",
         "library", "meadow", "mirror", "mountain", "needle", "orchard", "otter", "parrot", "pebble",
         "pepper", "piano", "planet", "pond", "quarry", "river", "saddle", "sailor", "shadow", "signal",
         "spider", "statue", "summit", "teapot", "temple", "thunder", "tiger", "tower", "tunnel", "valley",
         "violin", "wagon", "walnut", "window", "wizard")
_PEOPLE = ("the farmer", "a traveler", "the old teacher", "my neighbor", "the engineer", "a young painter",
           "the captain", "our guide", "the baker", "a quiet student", "the mayor", "the gardener")
_VERB_PAST = ("carried", "found", "painted", "repaired", "described", "remembered", "measured", "followed",
              "studied", "visited", "built", "watched", "noticed", "borrowed", "cleaned", "sold")
_PLACE = ("by the river", "in the valley", "near the old bridge", "at the edge of town", "under the tower",
          "behind the library", "on the hill", "across the meadow", "inside the castle", "along the coast")
_TIME = ("Early in the morning", "Later that year", "During the long winter", "Every spring",
         "On a rainy afternoon", "Before the harvest", "Years ago", "At dusk", "In those days",
         "After the storm")
_CLAUSE = ("because it seemed important at the time", "although nobody asked why",
           "while the others were asleep", "as the bells rang in the distance",
           "since the roads were closed", "and then wrote a short note about it",
           "without saying a word to anyone", "as if it were the most ordinary thing")
_PROSE = (
    "{time}, {who} {verb} the {adj} {noun} {place}.",
    "{Who} {verb} a {adj} {noun} {clause}.",
    "It is said that the {noun} {place} was once {adj}, and {who} still talks about it.",
    "Nobody knew why the {noun} was so {adj}, but {who} had a theory about the {noun2}.",
    "{time}, the {adj} {noun} and the {adj2} {noun2} were the talk of the village.",
    "{Who} believed that a {adj} {noun} is worth more than a {adj2} {noun2}.",
    "There was a {adj} {noun} {place}, and {who} {verb} it {clause}.",
    "The story of the {noun} is simple: {who} {verb} it, and the {noun2} did the rest.",
)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's noise haystack unit (one copy a line)."""

DEPTHS = tuple(round(100 * i / 39) for i in range(40))
"""RULER's needle depths in an essay haystack, in % (``np.round(np.linspace(0, 100, 40))``)."""

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _prose_sentence(rng: random.Random) -> str:
    """One generated English sentence (the prose haystack's unit)."""
    who = rng.choice(_PEOPLE)
    return rng.choice(_PROSE).format(
        time=rng.choice(_TIME), who=who, Who=who[0].upper() + who[1:], verb=rng.choice(_VERB_PAST),
        adj=rng.choice(_ADJ), adj2=rng.choice(_ADJ), noun=rng.choice(_NOUN), noun2=rng.choice(_NOUN),
        place=rng.choice(_PLACE), clause=rng.choice(_CLAUSE))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def _keys(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = _key(rng)
        if k not in out:
            out.append(k)
    return out


def _values(rng: random.Random, n: int, digits: int = 7, avoid=()) -> list[str]:
    """``n`` distinct random numbers of ``digits`` digits, none in ``avoid``."""
    seen = set(avoid)
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _letter_words(rng: random.Random, n: int, length: int, letters: str) -> list[str]:
    """``n`` distinct strings of ``length`` letters drawn with replacement (RULER's vt names, fwe words)."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choices(letters, k=length))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _syllable_words(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct pronounceable words of 2-3 consonant-vowel syllables (cwe's stand-in for English)."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


# ---------------------------------------------------------------------------------------- instances
@dataclass(frozen=True)
class _Instance:
    """A task drawn for one seed, before its length is fixed: ``render(k)`` is the user message with
    ``k`` filler units. Needles sit at fixed fractions of the filler, so a sample keeps its shape when cut."""

    render: Callable[[int], str]
    answers: tuple[str, ...]
    max_units: Callable[[int], int]     # an upper bound on useful k for a token budget
    answer_prefix: str = ""
    answer_text: str | None = None      # gold continuation after the prefix (default: " " + ", ".join(answers))


def _noise_lines(k: int) -> list[str]:
    """``k`` sentences of the noise unit, 5 a line (the last line may be partial: a prompt's length
    steps by one sentence, ~5 tokens, not one line, ~23, so it lands within 2% at 1K too)."""
    sentences = [x + "." for x in NOISE.rstrip(".").split(". ")]
    lines = [NOISE] * (k // len(sentences))
    return lines + ([" ".join(sentences[:k % len(sentences)])] if k % len(sentences) else [])


def _insert_lines(units: list[str], inserts: list[tuple[float, str]]) -> str:
    """Lines of ``units`` with each insert put before unit ``int(position * len(units))``, inserts
    kept in their given order (RULER's noise and needle haystacks: one unit a line)."""
    lines = list(units)
    for pos, text in sorted(inserts, key=lambda t: -t[0]):
        lines.insert(int(pos * len(units)), text)
    return "\n".join(lines)


def _insert_sentences(sentences: list[str], inserts: list[tuple[float, str]]) -> str:
    """Sentences joined by spaces with each insert at depth ``d`` % (RULER's essay haystack)."""
    parts = list(sentences)
    for depth, text in sorted(inserts, key=lambda t: -t[0]):
        parts.insert(int(len(sentences) * depth / 100), text)
    return " ".join(parts)


def _niah(rng: random.Random, *, haystack: str, n_keys: int = 1, n_values: int = 1, n_queries: int = 1) -> _Instance:
    keys = _keys(rng, n_keys)
    values = {k: _values(rng, n_values) for k in keys}
    needles = [_needle(k, v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    if haystack == "prose":                     # RULER: distinct depths of its 40, sorted, needles in that order
        depths = sorted(rng.sample(DEPTHS, len(needles)))
    else:                                       # RULER: uniform random lines of the noise / needle haystack
        depths = sorted(rng.random() for _ in needles)
    inserts = list(zip(depths, needles))
    queried = rng.sample(keys, n_queries)
    query = ", ".join(queried[:-1]) + ", and " + queried[-1] if n_queries > 1 else queried[0]
    pool_seed = rng.randrange(2 ** 31)

    if haystack == "needle":
        # one fixed order of the other keys, so k + 1 units are k units and one more (lengths grow
        # monotonically); past ~80K tokens reversed keys too (noun-adj, never a prefix of an asked adj-noun key)
        r = random.Random(pool_seed)
        pool = [f"{a}-{b}" for a in _ADJ for b in _NOUN]
        r.shuffle(pool)
        reversed_pool = [f"{b}-{a}" for a in _ADJ for b in _NOUN]
        r.shuffle(reversed_pool)
        pool = [x for x in pool + reversed_pool if x not in keys]
        pool_values = _values(r, len(pool), avoid=[v for vs in values.values() for v in vs])

        def context(k: int) -> str:
            # k // 5 needle lines, then k % 5 noise sentences on a last line: a needle line (~21 tokens)
            # is wider than 2% of 1K, a sentence (~5) is not
            n, rest = divmod(k, 5)
            lines = [_needle(x, v) for x, v in zip(pool[:n], pool_values[:n])]
            return _insert_lines(lines + _noise_lines(rest), inserts) if rest else _insert_lines(lines, inserts)
        per_unit = 4
    elif haystack == "noise":
        def context(k: int) -> str:
            return _insert_lines(_noise_lines(k), inserts)
        per_unit = 4
    else:
        def context(k: int) -> str:
            r = random.Random(pool_seed)
            return _insert_sentences([_prose_sentence(r) for _ in range(k)], inserts)
        per_unit = 12
    if n_queries * n_values == 1:               # RULER's rewrite of its template for one answer
        head = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the number afterwards.\n")
        q = f"What is the special magic number for {query} mentioned in the provided text?"
        prefix = f" The special magic number for {query} mentioned in the provided text is"
    else:
        head = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.\n")
        q = f"What are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f" The special magic numbers for {query} mentioned in the provided text are"
    answers = tuple(v for k in queried for v in values[k])

    def render(k: int) -> str:
        return head + context(k) + "\n" + q
    return _Instance(render, answers, lambda budget: budget // per_unit + 1, prefix)


_VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_ICL_UNITS = 14
"""Noise lines of vt's solved example: RULER fits it into 500 tokens (~14 lines with a Llama tokenizer)."""
VT_ICL_MIN_LENGTH = 1024
"""Below this length vt has no solved example (it alone would take ~150 tokens); RULER starts at 4K."""


def _vt_question(value: str, n: int) -> tuple[str, str]:
    q = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, {n} variables "
              f"are assigned the value {value}, they are: ")
    return q, prefix


def _vt_chain(rng: random.Random, hops: int, name_len: int) -> tuple[list[str], str, list[str]]:
    names = _letter_words(rng, hops + 1, name_len, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(hops)]
    return names, value, chain


def _vt(rng: random.Random, length: int, hops: int = 4) -> _Instance:
    # the solved example: 3-letter names, a short haystack, the answer after RULER's prefix
    icl_names, icl_value, icl_chain = _vt_chain(rng, hops, 3)
    icl_units = min(VT_ICL_UNITS, length // 256)
    icl_pos = sorted(rng.random() for _ in icl_chain)
    icl_q, icl_prefix = _vt_question(icl_value, hops + 1)
    example = (_VT_HEAD + _insert_lines([NOISE] * icl_units, list(zip(icl_pos, icl_chain))) + icl_q + icl_prefix
               + " " + " ".join(icl_names) + "\n\n") if length >= VT_ICL_MIN_LENGTH else ""
    names, value, chain = _vt_chain(rng, hops, 5)
    pos = sorted(rng.random() for _ in chain)
    q, prefix = _vt_question(value, hops + 1)

    def render(k: int) -> str:
        return example + _VT_HEAD + _insert_lines(_noise_lines(k), list(zip(pos, chain))) + q
    return _Instance(render, tuple(names), lambda budget: budget // 4 + 1, prefix, " ".join(names))


_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
_CWE_Q = "\nQuestion: What are the 10 most common words in the above list?"
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
CWE_SHORT = 4096
"""Below this length RULER's cwe repeats words less (common 6, others 1; example 20 words, 3 x 1)."""


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe(rng: random.Random, length: int, n_common: int = 10) -> _Instance:
    short = length < CWE_SHORT
    ex_words, ex_common, ex_rare = (20, 3, 1) if short else (40, 10, 3)
    freq_common, freq_rare = (6, 1) if short else (30, 3)
    seed = rng.randrange(2 ** 31)

    def draw(r: random.Random, n_words: int, common_rep: int, rare_rep: int) -> tuple[list[str], list[str]]:
        vocab = _syllable_words(r, n_words)
        common, rare = vocab[:n_common], vocab[n_common:]
        lst = common * common_rep + rare * rare_rep
        r.shuffle(lst)
        return common, lst

    ex_answer, ex_list = draw(random.Random(seed), ex_words, ex_common, ex_rare)
    example = _CWE_HEAD + _numbered(ex_list) + _CWE_Q + _CWE_PREFIX + " " + _numbered(ex_answer)

    def words(k: int) -> tuple[list[str], list[str]]:
        return draw(random.Random(seed + 1), n_common + k, freq_common, freq_rare)   # k: the rare words

    def render(k: int) -> str:
        return example + "\n" + _CWE_HEAD + _numbered(words(k)[1]) + _CWE_Q
    common = words(0)[0]
    return _Instance(render, tuple(common), lambda budget: budget // (4 * freq_rare) + 1, _CWE_PREFIX,
                     " " + _numbered(common))


_FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words. ")
_FWE_Q = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
          "frequently appeared words in the above coded text?")
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
_ZETA_2 = math.pi ** 2 / 6


def _fwe(rng: random.Random, length: int, alpha: float = 2.0, word_len: int = 6) -> _Instance:
    vocab = _letter_words(rng, max(8, length // 50), word_len, "abcdefghijklmnopqrstuvwxyz")
    vocab[0] = "..."                            # RULER: the top rank is noise; the answer is ranks 2-4
    zeta = _ZETA_2 if alpha == 2.0 else sum(i ** -alpha for i in range(1, 100_000))
    seed = rng.randrange(2 ** 31)

    def render(k: int) -> str:                  # k: the text's word count N; rank r appears floor(N r^-a / zeta)
        words = [w for r, w in enumerate(vocab, start=1) for _ in range(int(k * r ** -alpha / zeta))]
        random.Random(seed).shuffle(words)
        return _FWE_HEAD + " ".join(words) + _FWE_Q
    answers = tuple(vocab[1:4])
    return _Instance(render, answers, lambda budget: budget + 1, _FWE_PREFIX, " " + ", ".join(answers))


# ---------------------------------------------------------------------------------------- scoring
def string_match_all(prediction: str, answers) -> float:
    """RULER: the fraction of gold answers that occur in the prediction (case folded)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers) -> float:
    """RULER's QA metric: 1 when any gold answer occurs in the prediction (case folded), else 0."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


# ---------------------------------------------------------------------------------------- the task table
@dataclass(frozen=True)
class Task:
    """One built-in task: how to generate an instance, how many tokens to generate (RULER's
    ``tokens_to_generate``), how to score."""

    generate: Callable[[random.Random, int], _Instance]  # (rng, length) -> instance
    max_new_tokens: int
    metric: Callable[[str, tuple[str, ...]], float] = string_match_all


TASK_TABLE: dict[str, Task] = {
    "niah_single_noise": Task(lambda rng, _: _niah(rng, haystack="noise"), 128),
    "niah_single_prose": Task(lambda rng, _: _niah(rng, haystack="prose"), 128),
    "niah_multikey": Task(lambda rng, _: _niah(rng, haystack="needle"), 128),
    "niah_multivalue": Task(lambda rng, _: _niah(rng, haystack="prose", n_values=4), 128),
    "niah_multiquery": Task(lambda rng, _: _niah(rng, haystack="prose", n_keys=4, n_queries=4), 128),
    "vt": Task(_vt, 30),
    "cwe": Task(_cwe, 120),
    "fwe": Task(_fwe, 50),
}
TASKS: tuple[str, ...] = tuple(TASK_TABLE)
MAX_NEW_TOKENS: dict[str, int] = {name: t.max_new_tokens for name, t in TASK_TABLE.items()} | {JSONL_TASK: 32}
METRIC: dict[str, Callable[[str, tuple[str, ...]], float]] = (
    {name: t.metric for name, t in TASK_TABLE.items()} | {JSONL_TASK: string_match_all})


# ---------------------------------------------------------------------------------------- parsing
def split_items(value: str | list | tuple | None) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (empty entries dropped); None -> []."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def parse_length(text: str | int, what: str = "length") -> int:
    """``"4k"`` -> 4096, ``"0.5k"`` -> 512, ``"4096"`` -> 4096 (k = 1024). ``what`` names the input in errors."""
    if isinstance(text, int):
        value = text
    else:
        t = text.strip().lower()
        try:
            value = round(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
        except ValueError:
            raise InputError(f"{what} {text!r} is not a token count; use e.g. 4k (= 4096), 8k, 16000") from None
    if value <= 0:
        raise InputError(f"{what} {text!r} must be positive")
    return value


def parse_lengths(lengths, what: str = "length") -> list[int]:
    """``"4k,8k"`` (or a list, or one int) -> [4096, 8192]; at least one."""
    if isinstance(lengths, int):
        return [parse_length(lengths, what)]
    out = [parse_length(v, what) for v in split_items(lengths)]
    if not out:
        raise InputError(f"no {what} given; use e.g. 4k,8k")
    return out


def parse_tasks(tasks) -> list[str]:
    """``"all"`` or a comma list of task names -> the names."""
    names = split_items(tasks)
    if names == ["all"]:
        return list(TASKS)
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise InputError(f"unknown task(s) {bad or names}; accepted: all, {', '.join(TASKS)}")
    return names


# ---------------------------------------------------------------------------------------- public API
def count_tokens(tokenizer, text: str, *, chat: bool = True, answer_prefix: str = "") -> int:
    """Length of ``text`` in the model's tokens, chat template and ``answer_prefix`` included (as the model sees it)."""
    from .models import encode_prompt

    return int(encode_prompt(tokenizer, text, chat=chat, answer_prefix=answer_prefix).shape[-1])


def _fit(tokenizer, inst: _Instance, length: int, chat: bool, task: str) -> tuple[str, int]:
    """A prompt with a token count in ``[length * (1 - LENGTH_TOLERANCE), length]``.

    Token counts grow almost linearly in the filler units, so the unit count is found by
    interpolation between the closest counts known below and above the target (a few
    tokenizations of the full prompt), falling back to bisection when interpolation stalls."""
    floor = length * (1 - LENGTH_TOLERANCE)
    target = length - (length - floor) / 3          # aim inside the band, nearer its top
    n0 = count_tokens(tokenizer, inst.render(0), chat=chat, answer_prefix=inst.answer_prefix)
    if n0 > floor:
        raise InputError(f"length {length} is too short for task {task!r}: its prompt without filler is "
                         f"already {n0} tokens; ask for at least {int(n0 / (1 - LENGTH_TOLERANCE)) + 64}")
    lo = (0, n0, inst.render(0))                    # (units, tokens, prompt) with tokens <= length
    hi: tuple[int, int] | None = None               # (units, tokens) with tokens > length
    k = max(1, inst.max_units(length - n0))
    stalled = 0
    for _ in range(60):
        prompt = inst.render(k)
        n = count_tokens(tokenizer, prompt, chat=chat, answer_prefix=inst.answer_prefix)
        if n <= length:
            stalled = stalled + 1 if hi is not None and n < floor else 0
            lo = max(lo, (k, n, prompt), key=lambda t: t[1])
            if n >= floor:
                return prompt, n
        else:
            hi = (k, n) if hi is None or k < hi[0] else hi
            stalled = 0
        if hi is None:                              # still below: extrapolate the slope, at least double
            slope = max((lo[1] - n0) / lo[0], 1e-3) if lo[0] else 1.0
            k = max(2 * k, lo[0] + int((target - lo[1]) / slope) + 1)
            if k > 2 ** 24:
                break
            continue
        if hi[0] - lo[0] <= 1:
            break
        if stalled >= 2:                            # interpolation creeps along one side: bisect
            k, stalled = (lo[0] + hi[0]) // 2, 0
        else:
            k = lo[0] + round((target - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1]))
        k = min(max(k, lo[0] + 1), hi[0] - 1)
    if hi is None:
        raise InputError(f"task {task!r} cannot fill {length} tokens (its filler runs out); ask for less")
    return lo[2], lo[1]


# Estimating token counts before the tokenizer loads (the exact counts are checked after):
# a token of these prompts spans fewer bytes than this, so bytes / it is a lower bound ...
MAX_BYTES_PER_TOKEN = 8
# ... and a chat template adds fewer tokens than this, so bytes + it is an upper bound
MAX_TEMPLATE_TOKENS = 256


def check_lengths(lengths: list[int], tasks: list[str]) -> None:
    """Refuse, before any tokenizer loads, a length too short for a task's prompt without filler,
    from an estimate that errs long (:data:`MAX_BYTES_PER_TOKEN`); :func:`make_samples` confirms
    with the tokenizer."""
    for length in lengths:
        for task in tasks:
            bare = TASK_TABLE[task].generate(random.Random(f"{task}/{length}/estimate"), length).render(0)
            at_least = len(bare.encode()) // MAX_BYTES_PER_TOKEN
            if at_least > length * (1 - LENGTH_TOLERANCE):
                raise InputError(f"--lengths {length}: too short for task {task!r}, whose prompt without filler "
                                 f"has at least about {at_least} tokens; ask for a few times more")


def make_samples(tokenizer, task: str, length: int, n: int, *, seed: int = 0, chat: bool = True) -> list[Sample]:
    """``n`` samples of ``task`` about ``length`` tokens long (within 2% below, chat template and
    answer prefix included). Sample ``i`` depends only on (task, length, seed, i) and the tokenizer."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; accepted: {', '.join(TASKS)} (or 'all')")
    if not isinstance(length, int) or length <= 0:
        raise InputError(f"length must be a positive number of tokens, got {length!r}")
    out = []
    for i in range(n):
        rng = random.Random(f"{task}/{length}/{seed}/{i}")
        inst = TASK_TABLE[task].generate(rng, length)
        prompt, n_tok = _fit(tokenizer, inst, length, chat, task)
        if n_tok < length * (1 - LENGTH_TOLERANCE):
            raise InputError(f"task {task!r}: could not fill {length} tokens within 2% (got {n_tok})")
        answer_text = inst.answer_text if inst.answer_text is not None else " " + ", ".join(inst.answers)
        out.append(Sample(task=task, prompt=prompt, answers=inst.answers, answer_text=answer_text,
                          n_tokens=n_tok, answer_prefix=inst.answer_prefix))
    return out


def sample_grid(tokenizer, lengths: list[int], tasks: list[str], n: int, *, seed: int = 0,
                chat: bool = True) -> list[Sample]:
    """``n`` samples of every task at every length (:func:`make_samples`), lengths outer, tasks inner."""
    return [s for length in lengths for task in tasks
            for s in make_samples(tokenizer, task, length, n, seed=seed, chat=chat)]


def load_jsonl(path, tokenizer=None, chat: bool = True, *, min_tokens: int = 0, why: str = "") -> list[Sample]:
    """Samples from a file of ``{"prompt": str, "answer": str | [str, ...]}`` lines, optionally with
    ``"answer_prefix": str`` (the start of the reply the model continues; blank lines skipped). A bad
    line raises :class:`InputError` naming its number. ``n_tokens`` is 0 without
    a tokenizer. A prompt of at most ``min_tokens`` tokens is refused (``why`` says why): exactly
    with a tokenizer, and without one when even an upper estimate (bytes + a chat template's
    :data:`MAX_TEMPLATE_TOKENS`) is that short."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"samples file {str(path)!r} does not exist")
    out = []
    for no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not {"prompt", "answer"} <= set(row):
            raise InputError(f'{where}: expected an object with "prompt" and "answer"')
        prompt, answer = row["prompt"], row["answer"]
        answers = (answer,) if isinstance(answer, str) else answer
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f'{where}: "prompt" must be a non-empty string')
        if (not isinstance(answers, (list, tuple)) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise InputError(f'{where}: "answer" must be a non-empty string or a list of them')
        answers = tuple(answers)
        prefix = row["answer_prefix"] if "answer_prefix" in row else ""
        if not isinstance(prefix, str):
            raise InputError(f'{where}: "answer_prefix" must be a string (the start of the reply the model continues)')
        n_tok = count_tokens(tokenizer, prompt, chat=chat, answer_prefix=prefix) if tokenizer is not None else 0
        at_most = n_tok if tokenizer is not None else len((prompt + prefix).encode()) + MAX_TEMPLATE_TOKENS
        if at_most <= min_tokens:
            about = f"{n_tok} tokens" if tokenizer is not None else f"at most about {at_most} tokens"
            raise InputError(f"{where}: the prompt has {about}; {why or f'it needs more than {min_tokens}'}")
        out.append(Sample(task=JSONL_TASK, prompt=prompt, answers=answers, answer_text=", ".join(answers),
                          n_tokens=n_tok, answer_prefix=prefix))
    if not out:
        raise InputError(f"samples file {str(path)!r} holds no samples")
    return out


def score(task: str, prediction: str, answers) -> float:
    """The RULER score of ``prediction`` against the gold ``answers``, in [0, 1]."""
    if task not in METRIC:
        raise InputError(f"unknown task {task!r}; accepted: {', '.join(METRIC)}")
    answers = (answers,) if isinstance(answers, str) else tuple(answers)
    if not answers:
        raise InputError("score: no gold answers given")
    return METRIC[task](prediction, answers)
