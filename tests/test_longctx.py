"""bench/longctx.py: its generated tasks are repeatable, sized to the context, hold their answers,
and are scored as they say."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def longctx(bench_script):
    return bench_script("longctx")


@pytest.fixture(scope="module")
def tok():
    from kvkit.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))


def test_samples_are_repeatable_sized_and_hold_their_answers(longctx, tok):
    a = longctx.make_samples(tok, 1024, 2, seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in longctx.make_samples(tok, 1024, 2, seed=3)]
    assert {s.task for s in a} == set(longctx.TASKS) and len(a) == 2 * len(longctx.TASKS)
    for s in a:
        n = len(tok(s.prompt).input_ids)
        assert 850 <= n <= 1100, (s.task, n)
        body = s.prompt.rsplit("\n\n", 1)[0]
        assert all(x in body for x in s.answers), s.task  # every answer is in the text, not the question
    assert a[0].prompt != longctx.make_samples(tok, 1024, 1, seed=4)[0].prompt


def test_scores_count_the_share_of_answers_found(longctx):
    s = longctx.Sample("niah_multivalue", "", ["1234567", "7654321"], 8)
    assert longctx.score("They are 1234567 and 7654321.", s) == 1.0
    assert longctx.score("It is 1234567.", s) == 0.5
    copy = longctx.Sample("doc_copy", "", ["shall be  Licensed"], 8)
    assert longctx.score(" shall be licensed under", copy) == 1.0 and longctx.score("shall not", copy) == 0.0
    kept, dropped = longctx.kept_tasks({"a": 0.5, "b": 0.25}, 0.5)
    assert kept == ["a"] and "0.25 < 0.5" in dropped["b"]
