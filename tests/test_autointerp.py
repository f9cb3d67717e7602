"""Auto-interpretation: prompts, delphi-style detection and fuzzing with a scripted judge, and both explainers
(the local model's batched, prefix-sharing scoring against plain forwards; the HTTP path against a local server)."""

from __future__ import annotations

import http.server
import json
import math
import random
import re
import threading
from typing import ClassVar

import numpy as np
import pytest
import torch

from saepipe.analysis.activation_db import Example
from saepipe.analysis.autointerp import (
    Explanation,
    FeatureExamples,
    TokenJudge,
    auroc,
    balanced_accuracy,
    clean_explanation,
    explanation_prompt,
    fuzzing_windows,
    interpret,
    mark,
    mark_activating,
    sample_features,
    score_feature,
)
from saepipe.analysis.explainer import HTTPExplainer, LocalExplainer, shared_prefix
from saepipe.analysis.token_baseline import MIN_PRECISION, MIN_SHARE, rarity, token_explanation
from saepipe.errors import UserError

WORDS = [" the", " wave", " energy", " cell", " force", " acid", " mass", " light", " atom", " heat", " of", " and"]
CONCEPT = " photon"


def window(rng: random.Random, fires: bool, length: int = 12) -> Example:
    """A window of random words; when `fires`, the concept token sits at a random place and the feature fires
    exactly there (and nowhere else)."""
    tokens = [rng.choice(WORDS) for _ in range(length)]
    at = rng.randrange(length)
    if fires:
        tokens[at] = CONCEPT
    activations = [2.0 if t == CONCEPT else 0.0 for t in tokens]
    return Example(doc=0, position=at, activation=max(activations), marked=at, tokens=tokens,
                   activations=activations)


def concept_examples(seed: int = 0, n: int = 8) -> FeatureExamples:
    rng = random.Random(seed)
    return FeatureExamples(7, [window(rng, True) for _ in range(5)], [window(rng, True) for _ in range(n)],
                           [window(rng, False) for _ in range(n)])


class ScriptedJudge:
    """A fake explainer at the narrowest boundary (prompt in, text or P(Yes) out): it writes the explanation it
    is given and answers Yes exactly when the word the explanation quotes is in the excerpt (detection) or is
    the marked text (fuzzing)."""

    name = "scripted"

    def __init__(self, explanation: str):
        self.explanation = explanation
        self.prompts: list[list[dict[str, str]]] = []

    def generate(self, prompts, max_new_tokens):
        self.prompts += prompts
        return [f"Explanation: {self.explanation}\n(on a second line)" for _ in prompts]

    def yes_probability(self, prompts):
        out = []
        for chat in prompts:
            user = chat[-1]["content"]
            word = re.search(r'Explanation: the word "([^"]+)"', user).group(1)
            excerpt = re.search(r"Excerpt: (.*)\n\n", user, re.S).group(1)
            marked = re.findall(r"<<(.*?)>>", excerpt)
            if marked:  # fuzzing: are the marked tokens the concept?
                out.append(1.0 if all(m.strip() == word for m in marked) else 0.0)
            else:
                out.append(1.0 if f" {word}" in excerpt else 0.0)
        return np.array(out)


def test_marks_wrap_each_run_of_activating_tokens() -> None:
    tokens, activations = ["The", " cell", " div", "ides", "."], [0.0, 2.0, 0.0, 1.0, 1.5]
    example = Example(0, 1, 2.0, 1, tokens, activations)
    assert mark_activating(example) == "The<< cell>> div<<ides.>>"
    assert mark(tokens, [True, False, False, False, True]) == "<<The>> cell divides<<.>>"
    prompt = explanation_prompt([example, Example(0, 0, 1.0, 0, ["A", " B"], [1.0, 0.0])])
    assert prompt[0]["role"] == "system" and "<<this>>" in prompt[0]["content"]
    assert "Example 1: The<< cell>> div<<ides.>>\nExample 2: <<A>> B" in prompt[1]["content"]


def test_an_explanation_naming_the_token_scores_1_and_a_random_one_chance() -> None:
    examples = concept_examples()
    right = interpret(ScriptedJudge('the word "photon"'), [examples], max_new_tokens=10, seed=0)[0]
    assert right["id"] == 7 and right["explanation"] == 'the word "photon" (on a second line)'  # whole
    assert right["detection"] == 1.0 and right["fuzzing"] == 1.0
    assert right["detection_auc"] == 1.0 and right["fuzzing_auc"] == 1.0
    judged = right["examples"]["detection"]
    assert len(judged) == 16 and sum(e["activating"] for e in judged) == 8
    assert all("<< photon>>" in text for text in right["examples"]["explanation"])
    wrong = interpret(ScriptedJudge('the word "zebra"'), [examples], max_new_tokens=10, seed=0)[0]
    assert wrong["detection"] == 0.5 and wrong["fuzzing"] == 0.5  # always No: chance in balanced accuracy
    assert wrong["detection_auc"] == 0.5 and wrong["fuzzing_auc"] == 0.5  # and no ranking either


def test_a_judge_that_guesses_scores_near_chance() -> None:
    class Coin(ScriptedJudge):
        def yes_probability(self, prompts):
            return np.random.default_rng(len(self.prompts) + len(prompts)).random(len(prompts))

    records = [interpret(Coin('the word "photon"'), [concept_examples(seed, n=50)], 10, seed)[0]
               for seed in range(4)]
    assert np.mean([r["detection"] for r in records]) == pytest.approx(0.5, abs=0.08)
    assert np.mean([r["detection_auc"] for r in records]) == pytest.approx(0.5, abs=0.08)


def test_fuzzing_marks_non_activating_windows_where_an_activating_one_fires() -> None:
    examples = concept_examples()
    windows = fuzzing_windows(examples, random.Random(0))
    correct = [w.text() for w in windows if w.truth]
    wrong = [w for w in windows if not w.truth]
    assert len(correct) == len(wrong) == 8
    assert all(re.findall(r"<<(.*?)>>", t) == [CONCEPT] for t in correct)
    fired_at = {e.activations.index(2.0) for e in examples.activating}
    for w, e in zip(wrong, examples.non_activating, strict=True):
        (marked,) = re.findall(r"<<(.*?)>>", w.text())
        position = w.marked.index(True)
        assert marked == e.tokens[position] != CONCEPT and position in fired_at  # a borrowed position


def test_the_rule_judge_scores_the_concept_token_1_and_a_common_word_lower() -> None:
    examples = concept_examples(n=30)
    right = score_feature(TokenJudge(), Explanation('" photon" 100%', (CONCEPT,)), examples, seed=0)
    assert right["detection"] == right["fuzzing"] == 1.0 and right["detection_auc"] == 1.0
    assert right["detection_examples"][0]["p_yes"] == 1.0 and len(right["fuzzing_examples"]) == 60
    # " the" is in most windows, firing or not: detection falls towards chance; fuzzing marks it only by chance
    common = score_feature(TokenJudge(), Explanation('" the" 100%', (" the",)), examples, seed=0)
    assert 0.4 <= common["detection"] < 0.75 and common["fuzzing"] <= 0.6
    absent = score_feature(TokenJudge(), Explanation('"zebra"', ("zebra",)), examples, seed=0, keep_windows=False)
    assert absent == {"detection": 0.5, "detection_auc": 0.5, "fuzzing": 0.5, "fuzzing_auc": 0.5}


def test_scores_agree_with_scikit_learn() -> None:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(200):
        truth = rng.random(12) < 0.5
        truth[:2] = [True, False]
        p = rng.integers(0, 4, 12) / 3  # ties, and exactly 0.5-free thresholds
        assert auroc(truth, p) == pytest.approx(roc_auc_score(truth, p), abs=1e-12)
        assert balanced_accuracy(truth, p) == pytest.approx(balanced_accuracy_score(truth, p > 0.5), abs=1e-12)


def test_token_explanation_lists_the_tokens_that_hold_its_firings() -> None:
    ids = np.array([7] * 60 + [3] * 30 + [9] * 6 + [4] * 3 + [5])  # 4 and 5 hold < MIN_SHARE of the firings
    explanation, listed = token_explanation(ids, {7: " cell", 3: " cells", 9: "\n", 4: "x", 5: "y"}.get, 5)
    assert [t["token"] for t in listed] == [" cell", " cells", "\n"] and MIN_SHARE > 3 / 100
    assert [t["share"] for t in listed] == [0.6, 0.3, 0.06]
    assert explanation.tokens == (" cell", " cells", "\n") and explanation.text == '" cell" 60%, " cells" 30%, "\\n" 6%'
    # " cells" fires the feature on 30 of its 1,000 occurrences: a poor sign of it, left out
    totals = np.zeros(10, np.int64)
    totals[[7, 3, 9, 4, 5]] = [80, 1000, 6, 3, 1]
    precise, _ = token_explanation(ids, {7: " cell", 3: " cells", 9: "\n", 4: "x", 5: "y"}.get, 5, totals)
    assert precise.tokens == (" cell", "\n") and MIN_PRECISION > 30 / 1000
    one, _ = token_explanation(np.arange(100), str, 5)  # no token holds 5 %: the most frequent one still explains
    assert one.tokens == ("0",)
    totals = np.array([1000, 1, 10])
    assert rarity([{"id": 0, "share": 1.0}], totals, 1000) == 0.0  # on every row
    assert rarity([{"id": 1, "share": 1.0}], totals, 1000) == 1.0  # seen once
    assert rarity([{"id": 0, "share": 0.5}, {"id": 1, "share": 0.5}], totals, 1000) == pytest.approx(0.5)


def test_clean_explanation_and_feature_sample() -> None:
    assert clean_explanation('\n  Answer: "Mentions of heat transfer."') == "Mentions of heat transfer."
    # kept whole: a heading line alone says nothing (SmolLM2 often starts with one)
    assert clean_explanation("The marked tokens have the following characteristics:\n- names of\n  bacteria") == \
        "The marked tokens have the following characteristics: - names of bacteria"
    counts = np.array([0, 30, 5, 40, 50, 30])
    chosen = sample_features(counts, 2, shown=25, score_examples=5, seed=0)
    assert len(chosen) == 2 and set(chosen) <= {1, 3, 4, 5} and chosen == sorted(chosen)
    assert chosen == sample_features(counts, 2, shown=25, score_examples=5, seed=0)
    assert sample_features(counts, 10, shown=25, score_examples=5, seed=1) == [1, 3, 4, 5]


# ---- the local model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return LocalExplainer(tiny_model_dir, torch.device("cpu"), batch_size=3)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You judge whether the excerpt mentions energy."},
            {"role": "user", "content": f"Explanation: energy\n\nExcerpt: {text}\n\nYes or No?"}]


def test_batched_prefix_sharing_scores_equal_plain_forwards(local) -> None:
    prompts = [chat(t) for t in ["Energy is stored as ATP.", "Sound", "Waves carry energy without carrying matter.",
                                 "The pH scale is logarithmic.", "Force"]]
    ids = [local.encode(p) for p in prompts]
    assert shared_prefix(ids[:3]) >= 8  # the batch really reuses a cached prefix
    scored = local.yes_probability(prompts)  # batches of 3 and 2, each with its own prefix
    expected = []
    with torch.inference_mode():
        for x in ids:
            logits = local.model(input_ids=torch.tensor([x])).logits[0, -1, local.answer_ids]
            expected.append(torch.softmax(logits, -1)[0].item())
    np.testing.assert_allclose(scored, expected, atol=1e-5)
    assert np.all((scored > 0) & (scored < 1))


def test_batched_generation_equals_one_prompt_at_a_time(local, tiny_model_dir) -> None:
    prompts = [chat("Energy."), chat("Acids donate protons and bases accept them."), chat("Mass")]
    single = LocalExplainer(tiny_model_dir, torch.device("cpu"), batch_size=1)
    assert local.generate(prompts, 6) == single.generate(prompts, 6)  # left padding changes nothing


def test_shared_prefix_leaves_every_sequence_a_token() -> None:
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[4, 2], [1, 2]]) == 0


# ---- the HTTP endpoint ---------------------------------------------------------------------------------------
class ChatServer(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[tuple[dict[str, str], dict]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatServer.requests.append((dict(self.headers), body))
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        if body["max_tokens"] == 1:
            top = [{"token": "Yes", "logprob": math.log(0.6)}, {"token": " No", "logprob": math.log(0.2)},
                   {"token": "Maybe", "logprob": math.log(0.1)}]
            choice = {"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "top_logprobs": top}]}}
        else:
            choice = {"message": {"content": "Explanation: mentions of energy.\nAnd more."}}
        data = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    ChatServer.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_explainer_sends_the_key_in_the_header_and_never_prints_it(server, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SAEPIPE_TEST_KEY", "sk-secret-123")
    explainer = HTTPExplainer(f"{server}/v1", "served-model", "SAEPIPE_TEST_KEY")
    records = interpret(explainer, [concept_examples(n=2)], max_new_tokens=30, seed=0)
    assert records[0]["explanation"] == "mentions of energy. And more."
    assert [e["p_yes"] for e in records[0]["examples"]["detection"]] == [0.75] * 4  # 0.6 / (0.6 + 0.2)
    headers, body = ChatServer.requests[0]
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert body["model"] == "served-model" and body["temperature"] == 0.0 and body["max_tokens"] == 30
    assert body["messages"][0]["role"] == "system"
    scoring = ChatServer.requests[1][1]
    assert scoring["max_tokens"] == 1 and scoring["logprobs"] is True
    assert len(ChatServer.requests) == 1 + 4 + 4  # one explanation, 4 detection and 4 fuzzing prompts
    out = capsys.readouterr()
    assert "sk-secret-123" not in out.out + out.err + repr(explainer) + json.dumps(records)


def test_http_errors_are_one_line_without_the_key(server, monkeypatch) -> None:
    monkeypatch.setenv("SAEPIPE_TEST_KEY", "sk-secret-123")
    with pytest.raises(UserError, match=r"interp\.explainer_url=.*HTTP 404") as info:
        HTTPExplainer(f"{server}/wrong", None, "SAEPIPE_TEST_KEY").generate([chat("x")], 5)
    assert "sk-secret-123" not in str(info.value) and "\n" not in str(info.value)
    monkeypatch.delenv("SAEPIPE_TEST_KEY")
    with pytest.raises(UserError, match=r"interp\.explainer_api_key_env='SAEPIPE_TEST_KEY'"):
        HTTPExplainer(f"{server}/v1", None, "SAEPIPE_TEST_KEY")
    with pytest.raises(UserError, match=r"interp\.explainer_url=.*reachable"):
        HTTPExplainer("http://127.0.0.1:9/v1", None, None).generate([chat("x")], 5)


def test_http_answer_falls_back_to_the_text_without_logprobs() -> None:
    assert HTTPExplainer._answer({"message": {"content": "yes, it does"}}) == 1.0
    assert HTTPExplainer._answer({"message": {"content": "No."}}) == 0.0
    assert HTTPExplainer._answer({"message": {"content": "unclear"}}) == 0.5
