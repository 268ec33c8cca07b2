"""How the doctor's findings read on a terminal: `render(report)` for `tunesmith doctor`, `rejects_report` for
`train` when it stops on unusable rows. Pure text from the doctor.json dict (tunesmith/diagnosis/diagnose.py)."""
from __future__ import annotations

from collections import Counter

from tunesmith import io
from tunesmith.diagnosis.checks import excerpt, reason_kind
from tunesmith.splits import shot_lines


def table(header: list[str], rows: list[list]) -> list[str]:
    """tunesmith.io.table's lines, indented under a section title; fractions to 3 places."""
    return io.table(header, rows, digits=3, indent="  ").splitlines()


def files_table(files: list[dict]) -> list[str]:
    """Rows read, usable and rejected per file; a task whose reader rejects parts of rows (boxes of an image: the
    file entry's unit and part block, tunesmith.splits.counts) also gets the parts' columns."""
    head = ["file", "split", "read", "usable", "rejected"]
    if not (files and files[0].get("part")):
        return _files_notes(table(head, [[f["file"], f["split"], f["read"], f["usable"], f["rejected"]]
                                         for f in files]), files)
    unit, part, cols = files[0]["unit"], files[0]["part"], ["read", "usable", "rejected", "dropped"]
    rows = [[f["file"], f["split"], f["read"], f["usable"], f["rejected"], *(f["parts"][c] for c in cols)]
            for f in files]
    out = table(["file", "split", *(f"{unit} {c}" for c in head[2:]), *(f"{part} {c}" for c in cols)], rows)
    out.append(f"  {part} rejected: each one listed below; {part} dropped: those of rejected {unit}")
    return _files_notes(out, files)


def _files_notes(out: list[str], files: list[dict]) -> list[str]:
    return out + [f"  {f['file']}: no usable rows; its columns: {', '.join(f['columns']) or 'none'} (check "
                  f"data.*_column)" for f in files if f["read"] and not f["usable"]]


def rejects_report(loaded, listed: int = 20) -> str:
    """What `train` prints when data.bad_rows=error meets unusable rows: counts per file, per kind, the rows."""
    rejects = loaded.rejects
    lines = [f"{len(rejects):,} unusable row(s); fix them, or set data.bad_rows=skip to train on the rest "
             f"(each skipped row is listed in the run's rejects.jsonl)", *files_table(loaded.files), ""]
    lines += table(["reason", "rows"], list(Counter(reason_kind(r.reason) for r in rejects).most_common())) + [""]
    lines += [f"  {r.origin}: {r.reason}" for r in rejects[:listed]]
    if len(rejects) > listed:
        lines.append(f"  ... and {len(rejects) - listed:,} more: `tunesmith doctor RECIPE` lists every one "
                     f"in doctor.json")
    return "\n".join(lines)


def render(report: dict, listed: int = 20) -> str:
    """The terminal summary: one titled block per check, then the verdict."""
    r = report["recipe"]
    out = [f"tunesmith doctor · task {r['task']} · model {r['model']} · data {r['train']}", "", "Files",
           *files_table(report["files"])]
    used = " · ".join(f"{s} {n:,}" for s, n in report["splits"].items())
    how = ", stratified by label" if report["balance"].get("unit") == "rows" else ""
    out.append(f"  rows used: {used}" + (f" ({', '.join(report['split_from_train'])} split from train{how})"
                                         if report["split_from_train"] else ""))
    if report["unused_rows"]:
        out.append(f"  {report['unused_rows']:,} usable train rows left out by data.max_rows")
    out += [f"  {line}" for line in shot_lines(report.get("shots", {}), report["splits"])]   # older reports: none
    out += ["", "Unusable rows"]
    if report["rejects"]:
        out += table(["reason", "rows"], list(report["reject_kinds"].items()))
        out += [f"  {x['origin']}: {x['reason']}" for x in report["rejects"][:listed]]
        out += _more(report["rejects"], listed)
    else:
        out.append("  none")
    out += [f"  {x}" for x in report.get("check_notes", [])]
    if report.get("task_lines"):                    # the task's own checks (Task.findings_lines)
        out += ["", f"Checks of {r['task']}", *(f"  {x}" for x in report["task_lines"])]
    out += ["", "Duplicates within a split", *_render_duplicates(report["duplicates"], listed)]
    out += ["", "Leakage across splits", *_render_leakage(report["leakage"], listed)]
    out += ["", "Class balance", *_render_balance(report["balance"])]
    out += ["", "Lengths (tokens)", *_render_lengths(report["lengths"])]
    out += ["", "Label-noise candidates", *_render_noise(report["label_noise"], listed)]
    out += ["", f"Verdict: {report['status']} ({len(report['blocking'])} blocking, {len(report['warnings'])} "
                f"warning(s)) in {report['seconds']['total']:.1f}s"]
    out += [f"  BLOCKING  {x}" for x in report["blocking"]] + [f"  warning   {x}" for x in report["warnings"]]
    return "\n".join(out)


def _more(items: list, listed: int) -> list[str]:
    return [f"  ... and {len(items) - listed:,} more in doctor.json"] if len(items) > listed else []


def _note(section: dict) -> list[str]:
    return [f"  {section['note']}"] if section.get("note") else []


def _render_duplicates(d: dict, listed: int) -> list[str]:
    if not d["available"]:
        return _note(d)
    out = table(["split", "exact extra", "normalised extra"],
                [[s, x["exact_extra"], x["normalised_extra"]] for s, x in d["by_split"].items()])
    out.append("  conflicting labels: not available (Task.stratify_key gives no labels)" if d["conflicting"] is None
               else f"  conflicting labels (any split): {len(d['conflicting']):,} input(s)")
    groups = [("conflicting", "/".join(sorted(set(g["splits"]))), g) for g in d["conflicting"] or []]
    groups += [(kind, s, g) for kind in ("exact", "normalised") for s, x in d["by_split"].items() for g in x[kind]]
    for kind, s, g in groups[:listed]:
        labels = f" labels {sorted(set(map(str, g['labels'])))}" if kind == "conflicting" else ""
        out.append(f"  {kind:<11} {s:<10} x{len(g['origins'])}{labels} {excerpt(g['text'], 60)!r}: "
                   + ", ".join(g["origins"][:3]) + (" ..." if len(g["origins"]) > 3 else ""))
    return out + _more(groups, listed)


def _render_leakage(d: dict, listed: int) -> list[str]:
    if not d["available"]:
        return _note(d)
    near = f"near ({d['near_method']} >= {d['near_threshold']:g})"
    out = table(["splits", "exact", "normalised", near],
                [["/".join(s["splits"]), s["exact"], s["normalised"], s["near"]] for s in d["by_splits"]])
    out += _note(d)
    for p in d["pairs"][:listed]:
        text = f" {excerpt(p['text_b'], 50)!r}" if p["text_b"] is not None else ""
        out.append(f"  {p['kind']:<10} {p['similarity']:.2f}  {p['origin_b']} ~ {p['origin_a']}{text}")
    return out + _more(d["pairs"], listed)


def _render_balance(d: dict) -> list[str]:
    if not d["available"]:
        return _note(d)
    splits, unit = list(d["counts"]), d.get("unit", "rows")
    head = "label" if unit == "rows" else f"label ({unit})"
    out = table([head, *splits], [[n, *(d["counts"][s][n] for s in splits)] for n in d["labels"]])
    out.append(f"  train largest/smallest class: {d['train_ratio']:.2f}")
    return out + [f"  suggestion: {x}" for x in d["suggestions"]]


def _render_lengths(d: dict) -> list[str]:
    if not d["available"]:
        return _note(d)
    rows = []
    for s, x in d["by_split"].items():
        cut = f"{x['cut']:,} ({x['cut_share']:.1%})" if "cut" in x else "unknown"
        lost = f"{x['tokens_cut_share']:.1%}" if "cut" in x else "unknown"
        trained = f"{x['trained_share']:.1%}" if "trained_share" in x else "-"
        extra = [len(x.get("all_masked", [])), len(x.get("missing_end", []))]
        windowed = f"{len(x['windowed']):,}" if "windowed" in x else "-"
        rows.append([s, x["examples"], x.get("p50", 0), x.get("p90", 0), x.get("p99", 0), x.get("max", 0),
                     f"{cut} at {x['limit']}", lost, trained, *extra, windowed])
    out = table(["split", "examples", "p50", "p90", "p99", "max", "cut", "tokens cut", "trained", "all masked",
                 "no end", "windowed"], rows)
    for s, x in d["by_split"].items():
        if x.get("windowed"):
            out.append(f"  {s}: {len(x['windowed']):,} example(s) longer than {x['limit']} tokens, kept whole as "
                       f"overlapping windows: " + ", ".join(x["windowed"][:3]) + (" ..." if len(x["windowed"]) > 3
                                                                                 else ""))
    return out


def _render_noise(d: dict, listed: int) -> list[str]:
    if not d["available"]:
        return _note(d)
    out = [f"  {d['method']}", f"  out-of-fold accuracy {d['oof_accuracy']} on {d['checked']:,} rows; "
                                f"{len(d['candidates']):,} candidate(s)"
           + (f"; {d['skipped_rare']:,} rows of classes too rare to cross-validate skipped"
              if d["skipped_rare"] else "")]
    if d["oof_accuracy"] is not None and d["oof_accuracy"] < 0.9:
        out.append("  (a probe this weak also flags hard examples: read the candidates as 'mislabelled or hard')")
    out += table(["origin", "label", "suggested", "p(label)", "text"],
                 [[c["origin"], c["label"], c["suggested"], c["label_probability"], excerpt(c["text"] or "", 50)]
                  for c in d["candidates"][:listed]]) if d["candidates"] else []
    return out + _more(d["candidates"], listed)
