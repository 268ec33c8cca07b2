"""Sub-word alignment for token classification (tunesmith/tasks/token_classification.py), on a fast tokenizer alone:
sentences of words (is_split_into_words) become windows of sub-word ids with per-word bookkeeping; sentence
lengths for the doctor; each sub-word's character offsets for span grouping. No model, no torch tensors."""
from __future__ import annotations

from tunesmith.tasks import tagging
from tunesmith.tasks.base import Features


def words_like_text(tok, probe: str = "a b") -> bool:
    """Whether a word given alone (is_split_into_words) gets the ids it has after a space in running text."""
    enc = tok(probe, add_special_tokens=False, return_offsets_mapping=True)
    text = [i for i, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end > probe.rindex(" ")]
    words = tok(probe.split(), is_split_into_words=True, add_special_tokens=False)
    return text == [i for i, w in zip(words["input_ids"], words.word_ids()) if w == len(probe.split()) - 1]


def windows(tok, sents: list[tuple[list[str], list[int] | None]], limit: int, stride: int,
            inside: list[int] | None) -> Features:
    """One feature per window (see `window`) of each (words, tag ids or None) sentence: the whole sentence when
    it fits in `limit` sub-words (special tokens included), else windows of whole words sharing about `stride`
    sub-words (tagging.plan_windows), each word scored by the window where it is most central. inside: tag id ->
    the id later sub-words learn (data.label_all_subwords), or None (they learn nothing, -100)."""
    budget = limit - tok.num_special_tokens_to_add()
    out, cut = [], 0
    enc = tok([w for w, _ in sents], is_split_into_words=True, verbose=False) if sents else None
    for i, (words, tags) in enumerate(sents):
        ids, wids = enc["input_ids"][i], enc.word_ids(i)
        if len(ids) <= limit:
            out.append(window(i, ids, wids, range(len(words)), len(words), tags, inside))
            continue
        lengths = [0] * len(words)
        for w in wids:
            if w is not None:
                lengths[w] += 1
        plan = tagging.plan_windows(lengths, budget, stride)
        owner = tagging.owners(lengths, plan)
        cut += any(n > budget for n in lengths)
        for k, (a, b) in enumerate(plan):
            part = tok(words[a:b], is_split_into_words=True, truncation=True, max_length=limit)
            wids = [None if w is None else w + a for w in part.word_ids()]
            out.append(window(i, part["input_ids"], wids, [w for w in range(a, b) if owner[w] == k], len(words),
                              tags, inside))
    return Features(out, truncated=cut)


def window(row: int, ids: list[int], wids: list, own, n_words: int, tags: list[int] | None,
           inside: list[int] | None) -> dict:
    """input_ids, row, n_words, words (the word indices `own`: the ones it scores), first (their first sub-word's
    position, -1 for a word without sub-words), pieces (their sub-word counts); with tags also labels (the tag at
    each word's first sub-word, inside[tag] or -100 at the others, -100 at special tokens) and gold (the scored
    words' tags)."""
    first, pieces = {}, {}
    for p, w in enumerate(wids):
        if w is not None:
            first.setdefault(w, p)
            pieces[w] = pieces.get(w, 0) + 1
    own = list(own)
    f = {"input_ids": ids, "row": row, "n_words": n_words, "words": own, "first": [first.get(w, -1) for w in own],
         "pieces": [pieces.get(w, 0) for w in own]}
    if tags is not None:
        labels = [-100] * len(ids)
        for p, w in enumerate(wids):
            if w is not None and first[w] == p:
                labels[p] = tags[w]
            elif w is not None and inside is not None:
                labels[p] = inside[tags[w]]
        f["labels"], f["gold"] = labels, [tags[w] for w in own]
    return f


def length_stats(tok, sentences: list[list[str]], limit: int) -> dict:
    """Task.length_stats for sentences of words: lengths (sub-words, special tokens included), kept (the same less
    what is cut from words longer than a window: windows keep everything else), windowed (indices of the
    sentences longer than `limit`)."""
    budget = limit - tok.num_special_tokens_to_add()
    enc = tok(sentences, is_split_into_words=True, verbose=False)
    lengths, kept = [], []
    for i in range(len(sentences)):
        counts = {}
        for w in enc.word_ids(i):
            counts[w] = counts.get(w, 0) + 1
        lengths.append(len(enc["input_ids"][i]))
        kept.append(lengths[-1] - sum(max(0, n - budget) for w, n in counts.items() if w is not None))
    return {"lengths": lengths, "kept": kept, "windowed": [i for i, n in enumerate(lengths) if n > limit]}


def offsets(tok, words: list[str], starts: list[int]) -> list[list[tuple[int, int]]]:
    """Per word, the (start, end) character offsets of its sub-words in the text where the words begin at
    `starts`."""
    enc = tok(words, is_split_into_words=True, add_special_tokens=False, return_offsets_mapping=True)
    out = [[] for _ in words]
    for w, (a, b) in zip(enc.word_ids(), enc["offset_mapping"]):
        out[w].append((starts[w] + a, starts[w] + b))
    return out
