"""Frozen-feature cache: a run with the bottom blocks frozen trains from cached block-k inputs and ends with the
same metrics as without the cache; the cache is keyed by the frozen weights, the data and data.max_length."""
import pytest
from conftest import recipe_dict, write_reviews

import tunesmith as ts


def frozen(tiny_bert, data, **train):
    recipe = recipe_dict(tiny_bert, data, adapt={"method": "full", "freeze_embeddings": True, "freeze_layers": 1},
                         train={"epochs": 4, **train})
    return {**recipe, "model": {"name": str(tiny_bert), "dropout": 0.0}}


def test_cached_run_equals_uncached_run(tiny_bert, tmp_path, capfd):
    from tunesmith import featcache

    data = write_reviews(tmp_path / "r.csv", n=160)
    before = dict(featcache.STATS)
    cached = ts.train(ts.load_recipe(frozen(tiny_bert, data)), tmp_path / "cached")
    assert "feature cache: on: block-1 outputs computed once" in capfd.readouterr().out
    assert featcache.STATS["computed"] - before["computed"] == 96 + 32          # train + validation rows
    plain = ts.train(ts.load_recipe(frozen(tiny_bert, data, feature_cache=False)), tmp_path / "plain")
    assert "feature cache: off: train.feature_cache is false" in capfd.readouterr().out
    a, b = cached.metrics, plain.metrics
    for key in ("accuracy", "f1_macro", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    va = [r["loss"] for r in cached.history if r.get("split") == "validation"]
    vb = [r["loss"] for r in plain.history if r.get("split") == "validation"]
    assert va == pytest.approx(vb, abs=1e-4) and len(va) == 4
    assert ts.Run(tmp_path / "cached").load().evaluate()["accuracy"] == a["accuracy"]   # a plain saved model


def test_cache_is_reused_and_invalidated(tiny_bert, tmp_path, capfd):
    from tunesmith import featcache

    data = write_reviews(tmp_path / "r.csv", n=100)
    recipe = frozen(tiny_bert, data, epochs=1)
    ts.train(ts.load_recipe(recipe), tmp_path / "a")
    s = dict(featcache.STATS)
    ts.train(ts.load_recipe(recipe), tmp_path / "b")                              # same model, data, length
    assert featcache.STATS["computed"] == s["computed"] and featcache.STATS["reused"] - s["reused"] == 80
    shorter = {**recipe, "data": {**recipe["data"], "max_length": 6}}              # ids cut: new entries
    s = dict(featcache.STATS)
    ts.train(ts.load_recipe(shorter), tmp_path / "c")
    assert featcache.STATS["computed"] - s["computed"] > 40
    other = write_reviews(tmp_path / "o.csv", n=100, seed=7)                       # other data
    s = dict(featcache.STATS)
    ts.train(ts.load_recipe(frozen(tiny_bert, other, epochs=1)), tmp_path / "d")
    assert featcache.STATS["computed"] - s["computed"] > 40
    more = {**recipe, "adapt": {**recipe["adapt"], "freeze_layers": 2}}             # other frozen part: new key
    s = dict(featcache.STATS)
    ts.train(ts.load_recipe(more), tmp_path / "e")
    assert featcache.STATS["computed"] - s["computed"] == 80
    capfd.readouterr()
    ts.train(ts.load_recipe({**recipe, "model": str(tiny_bert)}), tmp_path / "f")   # default dropout 0.1
    assert "feature cache: off: dropout acts below block 1" in capfd.readouterr().out


def test_weights_key_changes_with_the_weights(tiny_bert):
    import torch
    from transformers import AutoModelForSequenceClassification

    from tunesmith.featcache import weights_key

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    key = weights_key(model, "bert.encoder.layer", 1)
    assert weights_key(model, "bert.encoder.layer", 1) == key
    bias = model.bert.encoder.layer[0].output.dense.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias += 1e-3
    assert weights_key(model, "bert.encoder.layer", 1) != key
    with torch.no_grad():
        bias.copy_(saved)
    assert weights_key(model, "bert.encoder.layer", 1) == key
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.bias += 1e-3                        # above k: same key
    assert weights_key(model, "bert.encoder.layer", 1) == key


def test_states_past_the_memory_limit_are_memory_mapped(tiny_bert, tmp_path, monkeypatch):
    import numpy as np

    from tunesmith import featcache

    data = write_reviews(tmp_path / "r.csv", n=100, seed=3)
    recipe = frozen(tiny_bert, data, epochs=2)
    monkeypatch.setattr(featcache, "_STORE", {})
    ram = ts.train(ts.load_recipe(recipe), tmp_path / "ram")
    assert all(id(t) in featcache._IN_RAM for st in featcache._STORE.values() for t in st.values())
    monkeypatch.setattr(featcache, "_STORE", {})
    monkeypatch.setattr(featcache, "MEMORY_LIMIT", 0)
    n0 = len(featcache.SPILLED)
    mapped = ts.train(ts.load_recipe(recipe), tmp_path / "mapped")
    states = [t for st in featcache._STORE.values() for t in st.values()]
    assert states and all(id(t) not in featcache._IN_RAM for t in states)
    files = [np.load(f, mmap_mode="r") for f in featcache.SPILLED[n0:]]        # train, then validation
    assert len(files) == 2 and sum(f.shape[0] for f in files) == sum(len(t) for t in states)
    first = next(iter(next(iter(featcache._STORE.values())).values()))
    assert np.array_equal(files[0][:len(first)], first.numpy())
    assert mapped.metrics["loss"] == ram.metrics["loss"] and mapped.metrics["accuracy"] == ram.metrics["accuracy"]
