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


# --- encoder-decoder models: both stacks of blocks, not the largest list alone -------------------------------------

def tiny_seq2seq(kind):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                   num_heads=2)), "encoder.block", "decoder.block"
    config = BartConfig(vocab_size=100, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    return BartForConditionalGeneration(config), "model.encoder.layers", "model.decoder.layers"


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_adapt_finds_encoder_and_decoder_blocks(kind):
    """T5 and BART: the encoder's and the decoder's blocks are found (the decoder's list alone is the largest, so
    picking it left the encoder as "stem", frozen whole by freeze_embeddings, or as "head" for T5, which has no
    parameter under its base_model_prefix); freeze_layers counts encoder blocks first; freeze_embeddings freezes
    the embeddings only; layer-wise LR decay runs through both stacks."""
    from tunesmith.adapt import find_stacks

    model, enc, dec = tiny_seq2seq(kind)
    assert find_stacks(model) == [enc, dec]
    a = adapt(model, AdaptConfig(method="freeze", freeze_layers=2))
    assert a.num_blocks == 4
    frozen = {n for n, p in a.model.named_parameters() if not p.requires_grad}
    encoder = enc.rpartition(".")[0] + "."                     # its blocks and final norm, not its embeddings
    assert frozen == {n for n, _ in a.model.named_parameters() if n.startswith(encoder) and ".embed_" not in n}
    model = tiny_seq2seq(kind)[0]
    a = adapt(model, AdaptConfig(method="freeze", freeze_embeddings=True))
    frozen = {n for n, p in a.model.named_parameters() if not p.requires_grad}
    assert frozen and all("shared" in n or "embed" in n for n in frozen), frozen
    assert all(p.requires_grad for n, p in a.model.named_parameters() if n.startswith(enc + "."))
    model = tiny_seq2seq(kind)[0]
    lr = {id(p): g["lr"] for g in adapt(model, AdaptConfig()).param_groups(1.0, 0.0, 0.5) for p in g["params"]}
    named = dict(model.named_parameters())
    first = lambda stack, i: next(n for n in named if n.startswith(f"{stack}.{i}."))
    order = [(dec, 1), (dec, 0), (enc, 1), (enc, 0)]                  # from the head down
    assert [lr[id(named[first(s, i)])] for s, i in order] == [0.5, 0.25, 0.125, 0.0625]
