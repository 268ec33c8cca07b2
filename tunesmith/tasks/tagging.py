"""Token classification without torch: the recipe, the prediction schema, tag schemes (IO, BIO/IOB2, BIOES),
sentence checks, the CoNLL reader, the word splitter for raw text and the window plan for long sentences.

A sentence is a list of words with one tag each: "O" or PREFIX-TYPE (B-PER, I-LOC, E-ORG, S-MISC). Rows come
as CoNLL (one word a line, blank line between sentences), JSONL {tokens, tags} or JSONL {text, spans}.
"""
from __future__ import annotations

import bisect
import re
from collections import Counter
from typing import ClassVar, Literal

from pydantic import Field, model_serializer, model_validator

from tunesmith.recipe import DataConfig, Guess, Recipe
from tunesmith.tasks.outputs import SpansPrediction

PREFIXES = {"IO": "I", "BIO": "BI", "IOB2": "BI", "BIOES": "BIES", "IOBES": "BIES"}
CANONICAL = {"IO": "IO", "BIO": "BIO", "IOB2": "BIO", "BIOES": "BIOES", "IOBES": "BIOES"}
CONLL_SUFFIXES = (".conll", ".conll03", ".iob", ".iob2", ".bio", ".bioes", ".txt", ".tsv")   # read as CoNLL
WORD = re.compile(r"\w+|[^\w\s]")               # raw text -> words: runs of letters/digits, or one other char


# --- recipe ------------------------------------------------------------------------------------------

class TokenClassificationData(DataConfig):
    tokens_column: str = "tokens"               # JSONL: the words of a sentence
    tags_column: str = "tags"                   # JSONL: one tag per word
    text_column: str = "text"                   # JSONL: raw text, with ...
    spans_column: str = "spans"                 # ... [{start, end, label}]: character offsets, end exclusive
    conll_columns: list[str] | None = None      # CoNLL: column names in file order (to pick columns by name)
    conll_token: int | str = 0                  # CoNLL: the word column, an index (negative from the end) or name
    conll_tag: int | str = -1                   # CoNLL: the tag column, an index or name
    tag_scheme: Literal["IO", "BIO", "IOB2", "BIOES", "IOBES"] = "BIO"
    tag_repair: bool = False                    # an invalid tag sequence is repaired (counted), not rejected
    label_all_subwords: bool = False            # train every sub-word (B- becomes I- after the first), not the first
    max_length: int = Field(128, gt=2)          # sub-word tokens per window, special tokens included
    stride: int = Field(32, ge=0)               # sub-word tokens shared by consecutive windows of a long sentence

    @model_validator(mode="after")
    def _columns(self):
        for key in ("conll_token", "conll_tag"):
            value = getattr(self, key)
            if isinstance(value, str) and value not in (self.conll_columns or []):
                raise ValueError(f"{key} '{value}' names a column, so data.conll_columns must list it "
                                 f"(now {self.conll_columns})")
        if self.stride >= self.max_length // 2:
            raise ValueError(f"stride {self.stride} must be under half of max_length {self.max_length} "
                             f"(windows would barely advance)")
        return self


class TokenClassificationRecipe(Recipe):
    task_class: ClassVar[str] = "tunesmith.tasks.token_classification:TokenClassification"
    metrics: ClassVar[dict[str, Literal["max", "min"]]] = {
        "f1": "max", "precision": "max", "recall": "max", "f1_macro": "max", "precision_macro": "max",
        "recall_macro": "max", "accuracy": "max", "loss": "min"}
    default_metric: ClassVar[str] = "f1"
    starter_model: ClassVar[tuple[str, str]] = ("minilm", "sentence-transformers/all-MiniLM-L6-v2")

    task: Literal["token-classification"]
    data: TokenClassificationData

    @classmethod
    def sniff(cls, profile) -> Guess | None:
        """CoNLL lines (a word and its tag a line, the tag last), or a table with lists of words and of tags, or
        with texts and their spans [{start, end, label}] (the columns data.*_column name, else found by shape)."""
        if profile.lines is not None and profile.suffix in CONLL_SUFFIXES:
            sentences = conll_sentences(profile.lines)
            if sentences:
                return _tagged(profile, sentences, {}, "CoNLL")
        if profile.rows is None:
            return None
        hints, lists = profile.hints, [c for c in profile.columns if profile.shape(c) == "list"]
        tags = hints.get("tags_column") or next((c for c in lists if _all(profile.values(c), _tag_list)), None)
        words = hints.get("tokens_column") or next((c for c in lists if c != tags and _all(profile.values(c), _words)),
                                                   None)
        if tags and words:
            sentences = [(r[words], r[tags]) for r in profile.rows if isinstance(r.get(words), list)
                         and isinstance(r.get(tags), list) and len(r[words]) == len(r[tags])]
            return _tagged(profile, sentences, {"tokens_column": words, "tags_column": tags}, "words and tags")
        spans = hints.get("spans_column") or next((c for c in lists if _all(profile.values(c), _span_list)), None)
        texts = [c for c in profile.columns if profile.shape(c) == "text"]
        text = hints.get("text_column") or (texts[0] if len(texts) == 1 else None)
        if spans and text:
            rows = [r for r in profile.rows if isinstance(r.get(text), str) and isinstance(r.get(spans), list)]
            sentences = [(split_words(r[text]), [s["label"] for s in r[spans] if isinstance(s, dict)]) for r in rows]
            kinds = Counter(k for _, ks in sentences for k in ks)
            about = [f"{len(rows):,} texts with spans; {profile.spread((len(w) for w, _ in sentences), 'words')}",
                     f"entity types: {', '.join(f'{k} {n:,}' for k, n in kinds.most_common())}"]
            return Guess(0.9, {"text_column": text, "spans_column": spans}, about)
        if spans:
            return Guess(0.6, ambiguous=f"spans in column '{spans}', but {len(texts)} text columns: choose one with "
                                        f"--text-column NAME" + "".join(f"\n  {profile.describe(c)}" for c in texts))
        return None


def _all(values: list, ok) -> bool:
    return bool(values) and all(ok(v) for v in values)


def _words(v) -> bool:
    return all(isinstance(w, str) for w in v)


def _tag_list(v) -> bool:
    return all(isinstance(t, str) and parse(t) != ("", "") for t in v)


def _span_list(v) -> bool:
    return all(isinstance(s, dict) and {"start", "end", "label"} <= set(s) for s in v)


def conll_sentences(lines: list[str]) -> list[tuple[list[str], list[str]]] | None:
    """The (words, tags) of CoNLL lines read as tunesmith/tasks/conll.py does with the default columns (the word
    first, the tag last), or None when fewer than 95% of the word lines end in a tag (O, B-X, I-X, E-X, S-X)."""
    out, words, tags, width, good, total = [], [], [], None, 0, 0
    for line in [*lines, ""]:
        fields = line.split("\t") if "\t" in line else line.split()
        if not line.strip() or fields[0] == "-DOCSTART-":
            if words:
                out.append((words, tags))
            words, tags = [], []
            continue
        total += 1
        width = width or len(fields)
        if len(fields) == width >= 2 and parse(fields[-1].strip()) != ("", ""):
            good += 1
            words.append(fields[0].strip())
            tags.append(fields[-1].strip())
    return out if total and good >= 0.95 * total else None


def _tagged(profile, sentences: list, data: dict, form: str) -> Guess:
    """The Guess for sentences of words and tags: the scheme their prefixes use, repair when they break it."""
    prefixes = {parse(t)[0] for _, tags in sentences for t in tags} - {"O", ""}
    scheme = "BIOES" if prefixes & {"E", "S"} else "BIO" if "B" in prefixes else "IO"
    data = dict(data) | ({"tag_scheme": scheme} if scheme != "BIO" else {})
    kinds = Counter(kind for _, tags in sentences for kind, _, _ in entities(tags))
    about = [f"{len(sentences):,} sentences ({form}); {profile.spread((len(w) for w, _ in sentences), 'words')}",
             f"entity types: {', '.join(f'{k} {n:,}' for k, n in kinds.most_common())}; tags: {scheme}"]
    broken = sum(violation(tags, scheme) is not None for _, tags in sentences)
    if broken:
        data["tag_repair"] = True
        about.append(f"data.tag_repair: {broken:,} sentences break {scheme} (an I- tag starting an entity, as in "
                     f"IOB1); they are read as seqeval reads them")
    return Guess(0.95, data, about)


class TaggedSpans(SpansPrediction):
    """One prediction: the kind "spans" (tasks/outputs.py); a pre-tokenized input ({tokens: [...]}) also gets a tag
    and its probability per token, and its spans are character offsets into the tokens joined by single spaces."""
    tags: list[str] | None = Field(None, description="pre-tokenized input only: one tag per token (B-PER, O, ...)")
    scores: list[float] | None = Field(None, description="pre-tokenized input only: each tag's probability")

    @model_serializer(mode="wrap")
    def _absent(self, handler):
        """A text's prediction is exactly the kind's {"spans"}: fields it lacks are left out, not written null."""
        return {k: v for k, v in handler(self).items() if v is not None}


# --- tags ----------------------------------------------------------------------------------------------

def parse(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER", ("O", "") for "O"; a tag of another shape gives ("", "")."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    return (prefix, kind) if dash and len(prefix) == 1 and prefix in "BIES" and kind else ("", "")


def tag_names(types: list[str], scheme: str) -> list[str]:
    """Every tag of `types` in `scheme`, "O" first (id 0), then per type in order its prefixes in scheme order."""
    return ["O"] + [f"{p}-{t}" for t in types for p in PREFIXES[scheme]]


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) per entity, end exclusive, read leniently with seqeval's default (conlleval) rules:
    an I- after O or after another type starts an entity; an entity ends at O, B-, S-, after E-, or at a
    change of type. The same chunks seqeval's default mode counts."""
    out, prev, prev_type, begin = [], "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        p, t = parse(tag)
        p, t = p or "O", t or "_"
        end = prev in "ES" or (prev in "BI" and p in "BSO") or (prev != "O" and prev_type != t)
        start = p in "BS" or (prev in "ESO" and p in "EI") or (p != "O" and prev_type != t)
        if end:
            out.append((prev_type, begin, i))
        if start:
            begin = i
        prev, prev_type = p, t
    return out


def emit(spans: list[tuple[str, int, int]], n: int, scheme: str) -> list[str]:
    """n tags marking `spans` ((type, start, end) over word positions, not overlapping) in `scheme`."""
    tags = ["O"] * n
    bioes = CANONICAL[scheme] == "BIOES"
    for t, a, b in spans:
        for i in range(a, b):
            p = "I"
            if CANONICAL[scheme] != "IO":
                p = "B" if i == a else "I"
                if bioes:
                    p = ("S" if b - a == 1 else "B") if i == a else ("E" if i == b - 1 else "I")
            tags[i] = f"{p}-{t}"
    return tags


def same_entities(true: list[str], pred: list[str], scheme: str) -> bool:
    """Whether `pred` has exactly the entities of `true` (valid tags) as the metrics count them: seqeval's default
    reading, and under BIOES (strict mode, where a chunk with an invalid transition counts for nothing) a
    predicted sequence with an invalid transition never does."""
    if CANONICAL[scheme] == "BIOES" and pred != true and violation(pred, scheme) is not None:
        return False
    return set(entities(true)) == set(entities(pred))


def repair(tags: list[str], scheme: str) -> list[str]:
    """The tags rewritten as valid `scheme` tags with the same entities as seqeval's default reading."""
    return emit(entities(tags), len(tags), scheme)


def violation(tags: list[str], scheme: str) -> tuple[int, str] | None:
    """(word index, what is wrong) for the first invalid transition in `scheme`, or None. IO has none."""
    scheme = CANONICAL[scheme]
    if scheme == "IO":
        return None
    prev_p, prev_t = "O", ""
    for k, tag in enumerate(tags):
        p, t = parse(tag)
        if scheme == "BIOES" and prev_p in "BI" and not (p in "IE" and t == prev_t):
            return k - 1, (f"{tags[k - 1]} is not closed (followed by {tag}): a BIOES entity ends with E- or is "
                           f"one S- tag")
        if p in "IE" and not (prev_p in "BI" and prev_t == t):
            where = "at the start of the sentence" if k == 0 else f"after {tags[k - 1]}"
            return k, f"{tag} {where}: a {scheme} entity starts with B-{t}" + (" or S-" if scheme == "BIOES" else "")
        prev_p, prev_t = p, t
    if scheme == "BIOES" and prev_p in "BI":
        return len(tags) - 1, f"{tags[-1]} ends the sentence unclosed: a BIOES entity ends with E- or is one S- tag"
    return None


# --- sentences -------------------------------------------------------------------------------------------

def split_words(text: str, cuts=()) -> list[tuple[int, int]]:
    """(start, end) character offsets of the words of `text` (WORD), also split at every offset in `cuts`."""
    cuts = sorted(set(cuts))
    out = []
    for m in WORD.finditer(text):
        a, b = m.span()
        for c in cuts[bisect.bisect_right(cuts, a):bisect.bisect_left(cuts, b)] + [b]:
            out.append((a, c))
            a = c
    return out


def joined(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The words joined by single spaces, and each word's character offsets in that text."""
    offsets, at = [], 0
    for w in words:
        offsets.append((at, at + len(w)))
        at += len(w) + 1
    return " ".join(words), offsets


def entity_spans(text: str, offsets: list[tuple[int, int]], tags: list[str], probs) -> list[dict]:
    """The entities of `tags` (one per word; words at `offsets` in `text`) as Span dicts, in text order; score:
    the mean of `probs` (one per word) over the entity's words."""
    out = []
    for kind, a, b in entities(tags):
        start, end = offsets[a][0], offsets[b - 1][1]
        out.append({"text": text[start:end], "start": start, "end": end, "label": kind,
                    "score": round(float(sum(probs[a:b]) / (b - a)), 6)})
    return out


def grouped_spans(text: str, pieces: list[tuple[int, int, str, float]]) -> list[dict]:
    """Span dicts of sub-words grouped as transformers' pipeline("token-classification") groups them under
    aggregation_strategy="simple" (TokenClassificationPipeline.group_entities): pieces are (start, end, tag,
    probability), in text order. A piece joins the group before it when it has the same type (the part after
    B- or I-; any other tag, O included, is a type of its own) and is not B-; a group's label is its first tag
    after the first dash, groups labelled O are left out; score: the mean probability of its pieces."""
    groups = []                                         # (type, first tag, [(start, end, probability)])
    for start, end, tag, prob in pieces:
        bi, kind = (tag[0], tag[2:]) if tag[:2] in ("B-", "I-") else ("I", tag)
        if groups and groups[-1][0] == kind and bi != "B":
            groups[-1][2].append((start, end, prob))
        else:
            groups.append((kind, tag, [(start, end, prob)]))
    out = []
    for _, tag, members in groups:
        label, start, end = tag.split("-", 1)[-1], members[0][0], members[-1][1]
        if label != "O":
            out.append({"text": text[start:end], "start": start, "end": end, "label": label,
                        "score": round(sum(p for _, _, p in members) / len(members), 6)})
    return out


def check_spans(text, spans, types: set[str] | None) -> str | None:
    """Why a {text, spans} row cannot be used, or None; types: the entity types of train (None: any)."""
    if not isinstance(text, str):
        return f"text has the wrong type ({type(text).__name__}), expected a string"
    if not text.strip():
        return "empty text"
    if not isinstance(spans, list):
        return f"spans must be a list of {{start, end, label}} (got {type(spans).__name__})"
    seen = []
    for k, s in enumerate(spans):
        ok = isinstance(s, dict) and all(isinstance(s.get(x), int) and not isinstance(s.get(x), bool)
                                         for x in ("start", "end"))
        if not ok or not 0 <= s["start"] < s["end"] <= len(text):
            return f"span {k} {s!r}: needs integer start and end with 0 <= start < end <= {len(text)}"
        if not isinstance(s.get("label"), str) or not s["label"].strip():
            return f"span {k} {s!r}: needs a label (a non-empty string)"
        if not text[s["start"]:s["end"]].strip():
            return f"span {k} {s!r} covers only blanks"
        if types is not None and s["label"] not in types:
            return f"entity type '{s['label']}' (span {k}) never appears in train"
        seen.append((s["start"], s["end"], k))
    seen.sort()
    for (a0, b0, k0), (a1, b1, k1) in zip(seen, seen[1:]):
        if a1 < b0:
            return f"spans {k0} [{a0}, {b0}) and {k1} [{a1}, {b1}) overlap"
    return None


def check_tags(tokens, tags, scheme: str, repairing: bool, types: set[str] | None) -> str | None:
    """Why a {tokens, tags} row cannot be used, or None (an invalid transition is fine when `repairing`)."""
    if not isinstance(tokens, list):
        return f"tokens must be a list of strings (got {type(tokens).__name__})"
    if not tokens:
        return "empty sentence: no tokens"
    if not isinstance(tags, list):
        return f"tags must be a list of strings (got {type(tags).__name__})"
    bad = next((k for k, w in enumerate(tokens) if not isinstance(w, str)), None)
    if bad is not None:
        return f"token {bad} is not a string ({type(tokens[bad]).__name__})"
    if not any(w.strip() for w in tokens):
        return "empty sentence: every token is blank"
    bad = next((k for k, w in enumerate(tokens) if not w.strip()), None)
    if bad is not None:
        return f"token {bad} is blank"
    if len(tokens) != len(tags):
        return f"{len(tokens)} tokens but {len(tags)} tags: one tag per token"
    allowed = ", ".join(["O"] + [f"{p}-TYPE" for p in PREFIXES[scheme]])
    for k, tag in enumerate(tags):
        p, t = parse(tag) if isinstance(tag, str) else ("", "")
        if p != "O" and (not p or p not in PREFIXES[scheme]):
            return f"tag {tag!r} (token {k}, {tokens[k]!r}) is not a tag of the {scheme} scheme ({allowed})"
        if types is not None and p != "O" and t not in types:
            return f"entity type '{t}' (token {k}, {tokens[k]!r}) never appears in train"
    wrong = None if repairing else violation(tags, scheme)
    if wrong:
        k, why = wrong
        return f"token {k} ({tokens[k]!r}): {why}; fix the tag or set data.tag_repair: true"
    return None


# --- windows over long sentences -------------------------------------------------------------------------

def plan_windows(lengths: list[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) word ranges covering every word: each holds whole words of at most `budget` sub-words
    (a single longer word stands alone and is cut), and the next starts about `stride` sub-words before the
    end of the last (always at least one word later)."""
    out, a, n = [], 0, len(lengths)
    while True:
        b, used = a, 0
        while b < n and used + lengths[b] <= budget:
            used += lengths[b]
            b += 1
        b = max(b, a + 1)
        out.append((a, b))
        if b >= n:
            return out
        c, back = b, 0
        while c - 1 > a and back + lengths[c - 1] <= stride:
            back += lengths[c - 1]
            c -= 1
        a = c


def owners(lengths: list[int], windows: list[tuple[int, int]]) -> list[int]:
    """For each word, the window that scores it: the one where it is most central (the larger of the
    sub-word distances to the window's nearer edge; ties to the earlier window)."""
    cum = [0]
    for x in lengths:
        cum.append(cum[-1] + x)
    best = [(-1, -1)] * len(lengths)                   # (centrality, -window)
    for k, (a, b) in enumerate(windows):
        for w in range(a, b):
            score = (min(cum[w] - cum[a], cum[b] - cum[w + 1]), -k)
            if score > best[w]:
                best[w] = score
    return [-k for _, k in best]
