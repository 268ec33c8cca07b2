"""Which parameters train: full, freeze specs, gradual unfreezing, layer-wise LR decay, LoRA."""
import pytest
from transformers import AutoModelForSequenceClassification

from tunesmith.adapt import adapt
from tunesmith.errors import TunesmithError
from tunesmith.recipe import AdaptConfig


def model(tiny_bert):
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3, ignore_mismatched_sizes=True)


def count(adapted, pred=lambda n: True):
    return sum(p.numel() for n, p in adapted.model.named_parameters() if p.requires_grad and pred(n))


def test_full_trains_everything(tiny_bert):
    a = adapt(model(tiny_bert), AdaptConfig(method="full"))
    assert count(a) == sum(p.numel() for p in a.model.parameters())
    assert a.num_blocks == 2


def test_freeze_backbone_trains_only_the_head(tiny_bert):
    a = adapt(model(tiny_bert), AdaptConfig(method="freeze", freeze_backbone=True))
    trained = {n for n, p in a.model.named_parameters() if p.requires_grad}
    assert trained == {"classifier.weight", "classifier.bias"}
    assert count(a) == 32 * 3 + 3


def test_freeze_embeddings_and_first_layer(tiny_bert):
    m = model(tiny_bert)
    total = sum(p.numel() for p in m.parameters())
    emb = sum(p.numel() for n, p in m.named_parameters() if n.startswith("bert.embeddings."))
    layer0 = sum(p.numel() for n, p in m.named_parameters() if n.startswith("bert.encoder.layer.0."))
    a = adapt(m, AdaptConfig(method="freeze", freeze_embeddings=True, freeze_layers=1))
    assert count(a) == total - emb - layer0
    assert not any(p.requires_grad for n, p in a.model.named_parameters() if "layer.0." in n)
    assert all(p.requires_grad for n, p in a.model.named_parameters() if "layer.1." in n)


def test_freeze_patterns_are_globs(tiny_bert):
    a = adapt(model(tiny_bert), AdaptConfig(freeze_patterns=["*attention*", "bert.pooler.*"]))
    frozen = {n for n, p in a.model.named_parameters() if not p.requires_grad}
    assert frozen and all("attention" in n or n.startswith("bert.pooler.") for n in frozen)


def test_gradual_unfreezing_goes_top_down(tiny_bert):
    a = adapt(model(tiny_bert), AdaptConfig(gradual_unfreeze=1))
    seen = []
    for epoch in range(4):
        a.set_epoch(epoch)
        seen.append({n.split(".")[1] if n.startswith("bert.") else "head" for n, p in a.model.named_parameters()
                     if p.requires_grad} | {f"layer{n.split('.')[3]}" for n, p in a.model.named_parameters()
                                             if p.requires_grad and ".layer." in n})
    assert "embeddings" not in seen[0] and "layer0" not in seen[0] and "layer1" not in seen[0]
    assert "layer1" in seen[1] and "layer0" not in seen[1]
    assert "layer0" in seen[2] and "embeddings" not in seen[2]
    assert "embeddings" in seen[3]


def test_layer_lr_decay_groups(tiny_bert):
    a = adapt(model(tiny_bert), AdaptConfig(layer_lr_decay=0.5))
    groups = a.param_groups(1.0, 0.01, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(a.model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == 1.0
    assert lr_of[id(named["bert.encoder.layer.1.attention.self.query.weight"])] == 0.5
    assert lr_of[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == 0.25
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])] == 0.125
    assert all(g["weight_decay"] == 0 for g in groups if any(p.ndim < 2 for p in g["params"]))


def test_lora_counts_adapters_plus_head(tiny_bert):
    a = adapt(model(tiny_bert), AdaptConfig(method="lora", lora={"r": 4}), "SEQ_CLS")
    trained = {n: p.numel() for n, p in a.model.named_parameters() if p.requires_grad}
    lora = sum(v for n, v in trained.items() if "lora_" in n)
    assert lora == 2 * 2 * 4 * (32 + 32)                   # 2 layers x (query, value) x r x (in + out)
    head = sum(v for n, v in trained.items() if "lora_" not in n)
    assert head == 32 * 3 + 3                              # the classifier trains too
    assert "trainable parameters" in a.summary()


def test_nothing_left_to_train_is_an_error(tiny_bert):
    with pytest.raises(TunesmithError, match="no parameter"):
        adapt(model(tiny_bert), AdaptConfig(freeze_patterns=["*"]))
