"""The data doctor on token-classification data (issue 21): rejects with file:line, entity-type balance, sentences
longer than max_length kept as windows, duplicate and leaked sentences, all through the Task contract."""
import re
from collections import Counter

from test_token_classification import recipe, sentences, tiny_tagger  # noqa: F401   (tiny_tagger: a fixture)

from tunesmith.diagnosis.diagnose import diagnose
from tunesmith.diagnosis.report import render
from tunesmith.tasks import tagging


def conll(path, sents) -> list[int]:
    """(tokens, tags) sentences as a CoNLL file (a tag None: the token's line lacks it); each one's first line."""
    lines, starts = [], []
    for tokens, tags in sents:
        starts.append(len(lines) + 1)
        lines += [w if t is None else f"{w}\t{t}" for w, t in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines))
    return starts


def test_the_doctor_reports_tagger_data(tiny_tagger, tmp_path):  # noqa: F811
    unique = list({tuple(t): (t, g) for t, g in sentences(300, seed=7)}.values())
    no_org = [(t, ["O" if x.endswith("ORG") else x for x in g]) for t, g in unique[:40]]
    with_org = [s for s in unique[40:] if "B-ORG" in s[1]]
    skewed = no_org + with_org[:2]                                              # ORG: 2-3 entities, PER: dozens
    planted = [(["Mary", "visited", "Paris"], ["B-PER", "O", "I-LOC"]),         # bad transition
               (["John", "lives", "in"], ["B-PER", None, "O"]),                 # a token without its tag
               (["word"] * 40 + ["Lagos"], ["O"] * 40 + ["B-LOC"]),             # 44 sub-words > max_length 32
               skewed[0]]                                                       # a duplicate of the first
    train, validation, test = (tmp_path / f"{s}.conll" for s in ("train", "validation", "test"))
    starts = conll(train, skewed + planted)
    rest = [s for s in unique[40:] if s not in with_org[:2]]
    conll(validation, rest[:10])
    test_starts = conll(test, rest[10:20] + [(["Ahmed"], ["B-MISC"]), skewed[1]])   # unknown type; leaked
    report = diagnose(recipe(tiny_tagger, train, validation=str(validation), test=str(test), bad_rows="skip"))
    printed = render(report)

    n = len(skewed)
    expected = {(f"{train}:{starts[n]}", "I-LOC after O"), (f"{train}:{starts[n + 1] + 1}", "1 column(s)"),
                (f"{test}:{test_starts[10]}", "entity type 'MISC'")}
    assert len(report["rejects"]) == 3
    assert {(o, why) for r in report["rejects"] for o, why in expected if r["origin"] == o and why in r["reason"]} \
        == expected
    assert all(f"  {r['origin']}: {r['reason']}" in printed for r in report["rejects"])

    b = report["balance"]
    assert b["available"] and b["unit"] == "entities"
    kept = {"train": skewed + planted[2:], "validation": rest[:10], "test": rest[10:20] + [skewed[1]]}
    for split, sents in kept.items():
        count = Counter(kind for _, g in sents for kind, _, _ in tagging.entities(g))
        assert b["counts"][split] == {k: count[k] for k in b["labels"]}
    assert b["labels"][-1] == "ORG" and b["train_ratio"] > 3
    assert any("train is skewed" in w and "in entities" in w for w in report["warnings"])
    assert not any("class_weights" in x or "stratified" in x for x in b["suggestions"])
    assert re.search(r"label \(entities\)\s+train\s+validation\s+test", printed)
    assert "stratified by label" not in printed

    lengths = report["lengths"]["by_split"]
    assert lengths["train"]["windowed"] == [f"{train}:{starts[n + 2]}"] and lengths["test"]["windowed"] == []
    assert lengths["train"]["cut"] == 0 and lengths["train"]["max"] == 44
    assert f"train: 1 example(s) longer than 32 tokens, kept whole as overlapping windows: {train}:{starts[n + 2]}" \
        in printed

    dup = report["duplicates"]["by_split"]["train"]["exact"]
    assert [g["origins"] for g in dup] == [[f"{train}:{starts[0]}", f"{train}:{starts[n + 3]}"]]
    leaks = [(p["kind"], p["origin_a"], p["origin_b"]) for p in report["leakage"]["pairs"]]
    assert leaks == [("exact", f"{train}:{starts[1]}", f"{test}:{test_starts[11]}")]


def test_repaired_tag_sequences_are_counted_not_rejected(tiny_tagger, tmp_path):  # noqa: F811
    good = list({tuple(t): (t, g) for t, g in sentences(60, seed=2)}.values())[:20]
    broken = [(["Mary", "visited", "Paris"], ["I-PER", "O", "I-LOC"]), (["John", "Smith"], ["B-PER", "I-LOC"])]
    train = tmp_path / "train.conll"
    conll(train, good + broken)
    report = diagnose(recipe(tiny_tagger, train, tag_repair=True))
    note = "train: 2 sentence(s) with an invalid BIO tag sequence repaired by data.tag_repair (3 tag(s) changed"
    assert report["rejects"] == [] and sum(report["splits"].values()) == 22
    assert [x[:len(note)] for x in report["check_notes"]] == [note] and report["check_notes"][0] in report["warnings"]
    assert note in render(report)
    strict = diagnose(recipe(tiny_tagger, train))
    assert [r["origin"] for r in strict["rejects"]] == [f"{train}:{sum(len(t) + 1 for t, _ in good) + k}"
                                                        for k in (1, 5)] and strict["check_notes"] == []
