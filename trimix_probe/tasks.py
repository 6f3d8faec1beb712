"""Synthetic long-context tasks in the spirit of RULER (Hsieh et al., 2024), generated from code.

Every sample is a pure function of ``(task, length, seed, index)`` and the tokenizer: the same
arguments give the same prompt on any machine. Lengths are counted in the model's own tokens, chat
template included; a prompt lands within 2% under the requested length (the filler is cut whole
units at a time; the unit count is found by interpolating the real token count).

Tasks (question at the END of the prompt, so the answer is the continuation the probe scores):

- ``niah_single_noise``: one needle ``One of the special magic numbers for {key} is: {value}.``
  in a haystack of repeated noise sentences (RULER's "The grass is green. The sky is blue. ...").
- ``niah_single_prose``: the same needle in generated prose (see below).
- ``niah_multikey``: the haystack is made only of needles of the same form with other keys
  (RULER ``niah_multikey_2``); one of them is asked for.
- ``niah_multivalue``: one key with 4 values scattered in prose; all 4 are asked for.
- ``niah_multiquery``: 4 keys with one value each in prose; all 4 are asked for.
- ``vt``: variable tracking, ``VAR A = 12345`` then ``VAR B = VAR A`` ... (4 hops), one statement
  per stretch of noise; asks which variables hold the value. Statements sit far apart (>> 512
  tokens at 4K), so copying the value along the chain needs attention across the middle.
- ``cwe``: common-words extraction: a numbered list where 10 words appear ``min(30, max(6,
  length // 256))`` times each (RULER: 30; fewer below 8K so they fit) and the rest 3 times each;
  asks for the 10 most common (RULER ``cwe``).
- ``fwe``: frequent-words extraction: "coded text" of random pseudo-words drawn from a Zipf
  distribution (alpha 2); asks for the 3 most frequent (RULER ``fwe``).

Scoring as RULER: ``string_match_all`` (fraction of gold answers found in the prediction, case
folded) for all built-in tasks and for a user JSONL (:func:`load_jsonl`).

A task is one entry in :data:`TASK_TABLE`: its generator, the tokens to generate, its metric.

Where the text comes from: no text is downloaded and nothing is read from the Python install.
The noise haystack is RULER's five sentences. The prose haystack is produced by a seeded
template generator in this module (:func:`_prose_sentence`): short English sentences built from
the word lists below; grammatical, topical, meaningless. Keys are adjective-noun pairs from the
same lists; values are random 7-digit numbers; pseudo-words (fwe, cwe, vt names) are random
letter strings. QA (SQuAD / HotpotQA in RULER) is left out: no public QA dataset ships inside a
package installed here, and fetching one at run time would break the "generated from code" rule.

Not verified: tokenizers other than SmolLM2's and Qwen2.5's (any Hugging Face tokenizer should
work; lengths are checked against the tokenizer actually used).
"""

from __future__ import annotations

import json
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
    answer_text: str             # gold continuation used as the probe objective, e.g. ", ".join(answers)
    n_tokens: int                # prompt length in the model's tokens, chat template included (0: not counted)


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
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


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


def _values(rng: random.Random, n: int, digits: int = 7) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in out:
            out.append(v)
    return out


def _pseudo_words(rng: random.Random, n: int, lo: int = 4, hi: int = 7, upper: bool = False) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if upper else "abcdefghijklmnopqrstuvwxyz"
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


# ---------------------------------------------------------------------------------------- instances
@dataclass(frozen=True)
class _Instance:
    """A task drawn for one seed, before its length is fixed: ``render(k)`` is the prompt with ``k``
    filler units. Needles sit at fixed fractions of the filler, so a sample keeps its shape when cut."""

    render: Callable[[int], str]
    answers: tuple[str, ...]
    max_units: Callable[[int], int]     # an upper bound on useful k for a token budget


_NIAH_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")


def _place(units: list[str], inserts: list[tuple[float, str]]) -> str:
    """Join filler ``units`` with each insert put at its depth (a fraction of the filler)."""
    parts = list(units)
    for depth, text in sorted(inserts, key=lambda t: -t[0]):
        parts.insert(round(depth * len(units)), text)
    return " ".join(parts)


def _noise(n: int) -> list[str]:
    # one sentence per unit, so a prompt's length steps by ~5 tokens
    sentences = [s + "." for s in _NOISE.rstrip(".").split(". ")]
    return [sentences[i % len(sentences)] for i in range(n)]


def _filler_stream(rng: random.Random, kind: str, n: int) -> list[str]:
    if kind == "noise":
        return _noise(n)
    return [_prose_sentence(rng) for _ in range(n)]


def _depths(rng: random.Random, n: int) -> list[float]:
    # needles between 10% and 90% depth: the middle of the context, away from sink and window
    return [rng.uniform(0.1, 0.9) for _ in range(n)]


def _niah(rng: random.Random, *, haystack: str, n_keys: int = 1, n_values: int = 1, n_queries: int = 1,
          needle_haystack: bool = False) -> _Instance:
    keys = _keys(rng, n_keys)
    values = {k: _values(rng, n_values) for k in keys}
    queried = keys[:n_queries]
    inserts = [(d, _needle(k, v)) for k in keys for v, d in zip(values[k], _depths(rng, n_values))]
    pool_seed = rng.randrange(2 ** 31)
    if needle_haystack:
        def filler(n: int) -> list[str]:
            r = random.Random(pool_seed)
            pairs = [f"{a}-{b}" for a in _ADJ for b in _NOUN]
            if n + n_keys > len(pairs):  # past ~80K tokens: reversed keys too (noun-adj, never a prefix of
                pairs += [f"{b}-{a}" for a in _ADJ for b in _NOUN]  # an asked adj-noun key); shorter prompts unchanged
            other = [k for k in r.sample(pairs, min(n + n_keys, len(pairs))) if k not in keys][:n]
            return [_needle(k, v) for k, v in zip(other, _values(r, len(other)))]
    else:
        def filler(n: int) -> list[str]:
            return _filler_stream(random.Random(pool_seed), haystack, n)
    if n_values > 1:
        q = (f"What are all the special magic numbers for {queried[0]} mentioned in the provided text? "
             f"There are {n_values} of them. Answer with the numbers only, separated by commas.")
    elif n_queries > 1:
        q = (f"What are all the special magic numbers for {', '.join(queried[:-1])}, and {queried[-1]} "
             "mentioned in the provided text? Answer with the numbers only, separated by commas.")
    else:
        q = (f"What is the special magic number for {queried[0]} mentioned in the provided text? "
             "Answer with the number only.")
    answers = tuple(v for k in queried for v in values[k])

    def render(k: int) -> str:
        return _NIAH_HEAD + _place(filler(k), inserts) + "\n\n" + q
    # tokens per unit: noise ~5, prose ~15, needle ~17
    return _Instance(render, answers, lambda budget: budget // (5 if haystack == "noise" and not needle_haystack else 16) + 1)


def _vt(rng: random.Random, hops: int = 4) -> _Instance:
    names = _pseudo_words(rng, hops + 1, 5, 5, upper=True)
    value = _values(rng, 1, 5)[0]
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    # statements in order, spread evenly over the middle 10%..90%
    depths = [0.1 + 0.8 * i / hops for i in range(hops + 1)]
    inserts = list(zip(depths, chain))
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    q = (f"Question: Find all variables that are assigned the value {value} in the text above. "
         "Answer with the variable names only, separated by commas.")

    def render(k: int) -> str:
        return head + _place(_noise(k), inserts) + "\n\n" + q
    return _Instance(render, tuple(names), lambda budget: budget // 5 + 1)


def _cwe(rng: random.Random, length: int, n_common: int = 10, freq_rare: int = 3) -> _Instance:
    # RULER's 30 repeats of each common word fill 2.5K tokens alone; below 8K the count shrinks
    # with the length so that the common words stay about a third of the list
    freq_common = min(30, max(6, length // 256))
    seed = rng.randrange(2 ** 31)
    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"

    def words(k: int) -> tuple[list[str], list[str]]:
        r = random.Random(seed)
        # k counts rare-word occurrences (one list item each), so the length steps by one item
        vocab = _pseudo_words(r, n_common + -(-k // freq_rare), 4, 8)
        common, rare = vocab[:n_common], vocab[n_common:]
        lst = common * freq_common + (rare * freq_rare)[:k]
        r.shuffle(lst)
        return common, lst

    q = (f"Question: What are the {n_common} most common words in the above list? "
         "Answer with the words only, separated by commas.")

    def render(k: int) -> str:
        _, lst = words(k)
        return head + " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)) + "\n" + q
    return _Instance(render, tuple(words(0)[0]), lambda budget: budget // 4 + 1)


def _fwe(rng: random.Random, n_top: int = 3, vocab_size: int = 200, alpha: float = 2.0) -> _Instance:
    seed = rng.randrange(2 ** 31)
    vocab = _pseudo_words(random.Random(seed), vocab_size, 3, 6)
    weights = [1.0 / (i + 1) ** alpha for i in range(vocab_size)]
    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words.\n")
    q = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
         "frequently appeared words in the above coded text? Answer with the words only, separated by commas.")

    def text(k: int) -> str:
        r = random.Random(seed + 1)
        ws = r.choices(vocab, weights=weights, k=k)
        # the top words must be the top words of this text, not only of the distribution
        return " ".join(ws) + " ...."

    def render(k: int) -> str:
        return head + text(k) + "\n" + q
    # answers: the n_top most probable words; their lead in counts is checked in make_samples
    return _Instance(render, tuple(vocab[:n_top]), lambda budget: budget + 1)


# ---------------------------------------------------------------------------------------- scoring
def string_match_all(prediction: str, answers) -> float:
    """RULER: the fraction of gold answers that occur in the prediction (case folded)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


# ---------------------------------------------------------------------------------------- the task table
@dataclass(frozen=True)
class Task:
    """One built-in task: how to generate an instance, how many tokens to generate, how to score."""

    generate: Callable[[random.Random, int], _Instance]  # (rng, length) -> instance
    max_new_tokens: int  # enough for the answer and a short lead-in ("The numbers are ...")
    metric: Callable[[str, tuple[str, ...]], float] = string_match_all


TASK_TABLE: dict[str, Task] = {
    "niah_single_noise": Task(lambda rng, _: _niah(rng, haystack="noise"), 24),
    "niah_single_prose": Task(lambda rng, _: _niah(rng, haystack="prose"), 24),
    "niah_multikey": Task(lambda rng, _: _niah(rng, haystack="noise", n_keys=1, needle_haystack=True), 24),
    "niah_multivalue": Task(lambda rng, _: _niah(rng, haystack="prose", n_values=4), 64),
    "niah_multiquery": Task(lambda rng, _: _niah(rng, haystack="prose", n_keys=4, n_queries=4), 64),
    "vt": Task(lambda rng, _: _vt(rng), 40),
    "cwe": Task(_cwe, 64),
    "fwe": Task(lambda rng, _: _fwe(rng), 32),
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
def count_tokens(tokenizer, text: str, *, chat: bool = True) -> int:
    """Length of ``text`` in the model's tokens, chat template included (as the model sees it)."""
    from .models import encode_prompt

    return int(encode_prompt(tokenizer, text, chat=chat).shape[-1])


def _fit(tokenizer, inst: _Instance, length: int, chat: bool, task: str) -> tuple[str, int]:
    """A prompt with a token count in ``[length * (1 - LENGTH_TOLERANCE), length]``.

    Token counts grow almost linearly in the filler units, so the unit count is found by
    interpolation between the closest counts known below and above the target (a few
    tokenizations of the full prompt), falling back to bisection when interpolation stalls."""
    floor = length * (1 - LENGTH_TOLERANCE)
    target = length - (length - floor) / 3          # aim inside the band, nearer its top
    n0 = count_tokens(tokenizer, inst.render(0), chat=chat)
    if n0 > floor:
        raise InputError(f"length {length} is too short for task {task!r}: its prompt without filler is "
                         f"already {n0} tokens; ask for at least {int(n0 / (1 - LENGTH_TOLERANCE)) + 64}")
    lo = (0, n0, inst.render(0))                    # (units, tokens, prompt) with tokens <= length
    hi: tuple[int, int] | None = None               # (units, tokens) with tokens > length
    k = max(1, inst.max_units(length - n0))
    stalled = 0
    for _ in range(60):
        prompt = inst.render(k)
        n = count_tokens(tokenizer, prompt, chat=chat)
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
    """``n`` samples of ``task`` about ``length`` tokens long (within 2% below, chat template
    included). Sample ``i`` depends only on (task, length, seed, i) and the tokenizer."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; accepted: {', '.join(TASKS)} (or 'all')")
    if not isinstance(length, int) or length <= 0:
        raise InputError(f"length must be a positive number of tokens, got {length!r}")
    out = []
    for i in range(n):
        rng = random.Random(f"{task}/{length}/{seed}/{i}")
        inst = TASK_TABLE[task].generate(rng, length)
        prompt, n_tok = _fit(tokenizer, inst, length, chat, task)
        answers = inst.answers
        if task == "fwe":
            answers = _top_words(prompt, len(answers))
        if n_tok < length * (1 - LENGTH_TOLERANCE):
            raise InputError(f"task {task!r}: could not fill {length} tokens within 2% (got {n_tok})")
        out.append(Sample(task=task, prompt=prompt, answers=answers, answer_text=", ".join(answers),
                          n_tokens=n_tok))
    return out


def sample_grid(tokenizer, lengths: list[int], tasks: list[str], n: int, *, seed: int = 0,
                chat: bool = True) -> list[Sample]:
    """``n`` samples of every task at every length (:func:`make_samples`), lengths outer, tasks inner."""
    return [s for length in lengths for task in tasks
            for s in make_samples(tokenizer, task, length, n, seed=seed, chat=chat)]


def _top_words(prompt: str, n: int) -> tuple[str, ...]:
    """fwe gold: the ``n`` most frequent coded words of the text actually shown (ties by first seen)."""
    text = prompt.split("\n")[1]
    counts: dict[str, int] = {}
    for w in text.split():
        if w != "....":
            counts[w] = counts.get(w, 0) + 1
    return tuple(sorted(counts, key=lambda w: -counts[w])[:n])


def load_jsonl(path, tokenizer=None, chat: bool = True, *, min_tokens: int = 0, why: str = "") -> list[Sample]:
    """Samples from a file of ``{"prompt": str, "answer": str | [str, ...]}`` lines (blank lines
    skipped). A bad line raises :class:`InputError` naming its number. ``n_tokens`` is 0 without
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
        n_tok = count_tokens(tokenizer, prompt, chat=chat) if tokenizer is not None else 0
        at_most = n_tok if tokenizer is not None else len(prompt.encode()) + MAX_TEMPLATE_TOKENS
        if at_most <= min_tokens:
            about = f"{n_tok} tokens" if tokenizer is not None else f"at most about {at_most} tokens"
            raise InputError(f"{where}: the prompt has {about}; {why or f'it needs more than {min_tokens}'}")
        out.append(Sample(task=JSONL_TASK, prompt=prompt, answers=answers, answer_text=", ".join(answers),
                          n_tokens=n_tok))
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
