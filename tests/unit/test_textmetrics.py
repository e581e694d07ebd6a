"""Generative metrics against values worked out by hand (and, for chrF, sacrebleu's corpus score)."""

import pytest
import sacrebleu

from tasks import textmetrics as tm


@pytest.mark.parametrize("text, expected", [
    ("The Cat, sat!", "cat sat"),
    ("  an   apple\ta day ", "apple day"),
    ("theatre anthem", "theatre anthem"),  # articles only as whole words
    ("A.", ""),
    ("", ""),
])
def test_normalise(text, expected):
    assert tm.normalise(text) == expected


def test_exact_match():
    assert tm.exact_match("The  Paris!", "paris") == 1.0
    assert tm.exact_match("Paris, France", "Paris") == 0.0
    assert tm.exact_match("", "the") == 1.0  # both normalise to ""


def test_token_f1_hand_checked():
    # Both normalise to "cat sat on mat": the articles differ only -> 1.0.
    assert tm.token_f1("the cat sat on the mat", "a cat sat on a mat") == 1.0
    # pred [cat sat on mat], ref [cat on hat]: 2 shared (cat, on); P = 2/4, R = 2/3,
    # F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7.
    assert tm.token_f1("the cat sat on the mat", "cat on a hat") == pytest.approx(4 / 7)
    # multiset overlap: pred [cat cat], ref [cat]: 1 shared; P = 1/2, R = 1 -> 2/3.
    assert tm.token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert tm.token_f1("dog", "cat") == 0.0
    assert tm.token_f1("", "") == 1.0 and tm.token_f1("the", "a") == 1.0
    assert tm.token_f1("", "cat") == 0.0 and tm.token_f1("cat", "") == 0.0


def test_rouge_l_hand_checked():
    # pred [cat sat on mat] (4), ref [the cat was sit(ting) on the mat] (7): LCS = cat on mat = 3;
    # P = 3/4, R = 3/7, F = 2PR/(P+R) = (18/28) / (33/28) = 6/11.
    assert tm.rouge_l("Cat sat on mat.", "the cat was sitting on the mat") == pytest.approx(6 / 11)
    # stemming is on: "dogs" -> "dog", so these are identical token sequences.
    assert tm.rouge_l("the dogs", "the dog") == pytest.approx(1.0)
    # order matters for the LCS: [b a] vs [a b] -> LCS 1, P = R = 1/2.
    assert tm.rouge_l("beta alpha", "alpha beta") == pytest.approx(0.5)
    assert tm.rouge_l("", "cat") == 0.0 and tm.rouge_l("", "") == 0.0


def test_chrf_hand_checked():
    # hyp "ab", ref "abc": 1-grams P 2/2, R 2/3; 2-grams P 1/1, R 1/2; orders 3-6 have no hyp n-gram
    # (effective order 2). Mean P = 1, mean R = (2/3 + 1/2)/2 = 7/12; chrF (beta 2) =
    # 5 P R / (4 P + R) = (35/12) / (55/12) = 7/11.
    assert tm.chrf("ab", "abc") == pytest.approx(7 / 11)
    assert tm.chrf("ab", "abc") == pytest.approx(sacrebleu.corpus_chrf(["ab"], [["abc"]]).score / 100)
    hyp, ref = "the cat sat on the mat", "the cat was on the mat"
    assert tm.chrf(hyp, ref) == pytest.approx(sacrebleu.corpus_chrf([hyp], [[ref]]).score / 100)
    assert 0.0 < tm.chrf(hyp, ref) < 1.0
    assert tm.chrf(ref, ref) == pytest.approx(1.0)
    assert tm.chrf("", ref) == 0.0 and tm.chrf("", "") == 0.0


def test_length_and_aggregate():
    assert tm.length_tokens("  a b\tc\n") == 3 and tm.length_tokens("") == 0
    rows = tm.row_scores(["The cat sat.", "hello there", "Paris"], ["the cat sat", "a dog barked loudly", ""],
                         embed=False)
    assert set(rows) == {"exact_match", "token_f1", "rouge_l", "chrf", "length", "reference_length"}
    assert rows["exact_match"] == [1.0, 0.0, 0.0]
    assert rows["length"] == [3.0, 2.0, 1.0] and rows["reference_length"] == [3.0, 4.0, 0.0]
    agg = tm.aggregate(rows)
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["length"] == pytest.approx(2.0)
    # ratio of sums (6 / 7), not the mean of per-row ratios (undefined for the empty reference)
    assert agg["length_ratio"] == pytest.approx(6 / 7)


def test_contract_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        tm.row_scores(["a", "b"], ["a"], embed=False)
    with pytest.raises(ValueError):
        tm.embedding_similarity(["a"], [])
    with pytest.raises(ValueError):
        tm.aggregate({})
    with pytest.raises(ValueError):
        tm.aggregate({"length": [1.0, 2.0], "reference_length": [0.0, 0.0]})
    assert tm.row_scores([], [], embed=False)["token_f1"] == []


def test_embedding_similarity():
    embedder = tm.Embedder()
    guitar = "A man is playing a guitar."
    same, paraphrase, unrelated = tm.embedding_similarity(
        [guitar, guitar, guitar], [guitar, "Someone plays the guitar.", "The stock market fell sharply today."],
        embedder)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > unrelated + 0.3
    assert -1.0 <= unrelated <= 1.0
    # batching and padding do not change a row's value
    embedder.batch_size = 1
    assert tm.embedding_similarity([guitar], ["Someone plays the guitar."], embedder)[0] == pytest.approx(
        paraphrase, abs=1e-5)
    rows = tm.row_scores([guitar], [guitar])
    assert rows["embedding_similarity"][0] == pytest.approx(1.0, abs=1e-5)
