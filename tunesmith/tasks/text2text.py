"""Text-to-text: a source text in, a target text out (translation, summarisation, rewriting), for both model families
under one recipe, chosen by the model's config (is_encoder_decoder):

  encoder-decoder  AutoModelForSeq2SeqLM (T5, BART, Marian, mT5, NLLB): the prompt is the encoder's input; labels are
                   the target's tokens through its end token. input_ids [B, S], attention_mask [B, S], labels [B, T]
  decoder-only     AutoModelForCausalLM trained on prompt -> target with the prompt masked: the causal-lm task's own
                   encoding, collation and loss (`self.lm`, a CausalLM on a derived recipe), the row becoming one user
                   turn (the prompt) and one assistant turn (the target) of the tokenizer's chat template, or of
                   PLAIN ("prompt\\ntarget<eos>") when the tokenizer has none

The prompt is data.template / data.prefix applied to the source (text2text_schema.Text2TextData.prompt); a source is
cut so the prompt fits data.max_length tokens, a target to data.max_target_length (both counted). Evaluation:
token-weighted loss and perplexity at every validation (plus the generation scores when train.metric is one of
them); the final evaluation also generates (batched, eval.generate: greedy, beam search or sampling) and scores with
sacrebleu and rouge-score (text2text_schema.scores), with length statistics and samples.jsonl.

Declares: prediction "text" ({prompt: the source, output}); `chats` only for a decoder-only model with a chat template
of its own (or data.chat_template); export_generation(): encoder-decoder runs export to ONNX through optimum-onnx
(tunesmith/deploy/export_generate.py), decoder-only ones only as the HF folder (export --format hf), as causal-lm.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.tasks import text2text_schema as schema
from tunesmith.tasks.base import Features, blank
from tunesmith.tasks.causal_lm import CausalLM, token_losses
from tunesmith.tasks.generation import SAMPLES, Generative
from tunesmith.tasks.hf import load_error, load_hf
from tunesmith.tasks.text import Tokenized

PLAIN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
         "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}")


class Text2Text(Tokenized, Generative):
    name = "text2text"
    input_key = "source"

    def __init__(self, recipe, pad_multiple: int = 1):
        super().__init__(recipe, pad_multiple)
        self._encoder_decoder: bool | None = None
        self._chat = False
        self.lm: CausalLM | None = None           # decoder-only: encodes, collates and scores like causal-lm
        self._budget: int | None = None           # tokens left for the source once the prompt's own are counted

    # --- what the model is ---------------------------------------------------------------------------
    @property
    def encoder_decoder(self) -> bool:
        if self._encoder_decoder is None:
            self.setup()
        return self._encoder_decoder

    @property
    def peft_task_type(self) -> str:
        return "SEQ_2_SEQ_LM" if self.encoder_decoder else "CAUSAL_LM"

    @property
    def chats(self) -> bool:
        """A decoder-only model with a chat template of its own (or data.chat_template)."""
        return not self.encoder_decoder and self._chat

    def load_processor(self, source, revision):
        from transformers import AutoConfig, AutoTokenizer

        kw = {"revision": revision, "trust_remote_code": self.trust_remote_code}
        try:
            self._encoder_decoder = bool(AutoConfig.from_pretrained(source, **kw).is_encoder_decoder)
        except (OSError, ValueError) as e:
            raise load_error(source, e) from None
        self._budget = None
        if not self._encoder_decoder:
            template = self.recipe.data.chat_template or AutoTokenizer.from_pretrained(source, **kw).chat_template
            self._chat = bool(template) and template != PLAIN
            self.lm = CausalLM(self.lm_recipe(template or PLAIN), self.pad_multiple)
            self.lm._processor = self.lm.load_processor(source, revision)
            return self.lm._processor
        tok = AutoTokenizer.from_pretrained(source, **kw)
        if tok.eos_token_id is None or tok.pad_token_id is None:
            raise TunesmithError(f"{source}: an encoder-decoder tokenizer needs an end token and a pad token "
                                 f"(eos {tok.eos_token!r}, pad {tok.pad_token!r})")
        return tok

    def lm_recipe(self, template: str):
        """The causal-lm recipe the decoder-only family runs under: room for the prompt, the target and the
        template's own tokens (sources and targets are cut before they get there)."""
        from tunesmith.tasks.schema import CausalLMRecipe

        r = self.recipe
        return CausalLMRecipe.model_validate({
            "task": "causal-lm", "model": r.model.model_dump(),
            "data": {"train": r.data.train, "chat_template": template,
                     "max_length": r.data.max_length + r.data.max_target_length + 64},
            "train": {"precision": r.train.precision}, "eval": {"generate": r.eval.generate}})

    def export_generation(self) -> str | None:
        """Encoder-decoder: ONNX through optimum-onnx (encoder and decoder graphs, KV cache); decoder-only: none,
        as causal-lm (export --format hf)."""
        return "text2text-generation-with-past" if self.encoder_decoder else None

    # --- rows ------------------------------------------------------------------------------------------
    def check(self, row: dict, split: str) -> str | None:
        cfg = self.recipe.data
        for column in (cfg.source_column, cfg.target_column):
            value = row.get(column)
            if value is None:
                return f"missing column '{column}'"
            if not isinstance(value, str):
                return f"column '{column}' must be a string, got {type(value).__name__}"
            if blank(value):
                return f"empty {'source' if column == cfg.source_column else 'target'} (column '{column}')"
        return None

    def check_input(self, item) -> str | None:
        column = self.recipe.data.source_column
        text = item.get(column) if isinstance(item, dict) else item
        if not isinstance(text, str):
            return f"expected a text, or a row with a '{column}' string"
        return "empty input" if blank(text) else None

    def key(self, row: dict) -> str:
        return str(row.get(self.recipe.data.source_column))

    def source(self, item) -> str:
        return item[self.recipe.data.source_column] if isinstance(item, dict) else item

    def clip(self, text: str, limit: int) -> tuple[str, int]:
        """(text cut after its first `limit` tokens, its tokens before the cut); special tokens not counted."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        n = len(enc["input_ids"])
        return (text, n) if n <= limit else (text[:enc["offset_mapping"][max(limit, 1) - 1][1]], n)

    def budget(self) -> int:
        """Tokens of data.max_length left for the source: less the prompt's own (template/prefix) and, for an
        encoder-decoder model, its special tokens."""
        if self._budget is None:
            empty = self.recipe.data.prompt("")
            own = len(self.tokenizer(empty, add_special_tokens=self.encoder_decoder)["input_ids"]) if empty else (
                self.tokenizer.num_special_tokens_to_add() if self.encoder_decoder else 0)
            self._budget = max(1, self.recipe.data.max_length - own)
        return self._budget

    def target_budget(self) -> int:
        """Tokens of data.max_target_length left for the target's text (its end token counted)."""
        special = self.tokenizer.num_special_tokens_to_add() if self.encoder_decoder else 1
        return max(1, self.recipe.data.max_target_length - special)

    def prompt(self, item) -> tuple[str, bool]:
        """(the model's prompt for a row or source string, whether the source was cut)."""
        text, n = self.clip(self.source(item), self.budget())
        return self.recipe.data.prompt(text), n > self.budget()

    # --- features --------------------------------------------------------------------------------------
    def encode(self, rows: list[dict]) -> Features:
        """One feature per row: input_ids and labels (what trains), prompt_ids (what generation continues) and
        the reference text; Features.truncated counts cut sources, .targets_cut cut targets."""
        out, cut, cut_targets = [], 0, 0
        target_col = self.recipe.data.target_column
        for row in rows:
            prompt, was_cut = self.prompt(row)
            target, n = self.clip(row[target_col], self.target_budget())
            cut, cut_targets = cut + was_cut, cut_targets + (n > self.target_budget())
            f = {"reference": row[target_col]}
            if self.encoder_decoder:
                f["input_ids"] = self.tokenizer(prompt, truncation=True, max_length=self.max_length,
                                                verbose=False)["input_ids"]
                f["labels"] = self.tokenizer(text_target=target, verbose=False)["input_ids"]
                f["prompt_ids"] = f["input_ids"]
            else:
                msgs = [{"role": "user", "content": prompt}]
                f["input_ids"], f["labels"], _ = self.lm.encode_one(msgs + [{"role": "assistant", "content": target}])
                f["prompt_ids"] = self.lm.prompt_ids(msgs)
            out.append(f)
        if cut_targets:
            print(f"{cut_targets:,} of {len(rows):,} targets cut at data.max_target_length="
                  f"{self.recipe.data.max_target_length}", file=sys.stderr)
        features = Features(out, truncated=cut)
        features.targets_cut = cut_targets
        return features

    def length(self, feature: dict) -> int:
        return len(feature["input_ids"]) + (len(feature["labels"]) if self.encoder_decoder else 0)

    def length_stats(self, rows: list[dict], features: list[dict]) -> dict:
        """Prompt tokens per row, kept and before the cut (the targets' lengths: doctor_findings)."""
        kept, full = [], []
        for row in rows:
            prompt, _ = self.prompt(row)
            n = self.clip(self.source(row), self.budget())[1]
            kept.append(len(self.tokenizer(prompt, add_special_tokens=self.encoder_decoder)["input_ids"]))
            full.append(kept[-1] + max(0, n - self.budget()))
        return {"kept": kept, "lengths": full}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not self.encoder_decoder:
            return self.lm.collate(features)
        # input_ids, attention_mask [B, S] right-padded; labels [B, T] padded with -100
        width = self.padded(max(len(f["input_ids"]) for f in features))
        ids = torch.full((len(features), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        span = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), -(-span // self.pad_multiple) * self.pad_multiple), -100, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, :len(f["input_ids"])] = 1
            labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    # --- model -----------------------------------------------------------------------------------------
    def load_model(self):
        from transformers import AutoModelForSeq2SeqLM

        if self.recipe.adapt.freeze_encoder and not self.encoder_decoder:
            raise TunesmithError(f"adapt.freeze_encoder: model '{self.recipe.model.name}' is decoder-only (it has no "
                                 "encoder); unset it")
        if not self.encoder_decoder:
            return self.lm.load_model()
        return load_hf(AutoModelForSeq2SeqLM, self.recipe.model)[0]

    def load_trained(self, folder):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        self.setup(str(folder))
        auto = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
        return auto.from_pretrained(folder, weights_only=True, trust_remote_code=self.trust_remote_code)

    def save(self, model, folder) -> None:
        """The HF folder; generate() (and plain transformers) stop at the tokenizer's end token and pad with its pad
        token; config.prefix holds data.prefix, as T5's task prefixes are recorded."""
        if not self.encoder_decoder:
            return self.lm.save(model, folder)
        model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        if self.recipe.data.prefix is not None:
            model.config.prefix = self.recipe.data.prefix
        super().save(model, folder)

    # --- training and evaluation -----------------------------------------------------------------------
    def loss(self, model, batch: dict) -> torch.Tensor:
        """Summed cross-entropy over the target tokens (labels != -100), in float32, with the LM head applied only at
        those tokens (head_at; not under train.compile, whose graph would be rebuilt for each hook)."""
        if not self.encoder_decoder:
            return self.lm.loss(model, batch)
        labels = batch["labels"]                                       # [B, T]
        keep = labels != -100                                          # [B, T] bool: the N target tokens
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        inputs["decoder_input_ids"] = self.decoder_inputs(model, labels)
        with nullcontext() if self.recipe.train.compile else head_at(model, keep):
            logits = model(**inputs).logits                            # [N, V]; [B, T, V] without head_at
        if logits.dim() == 3:
            logits = logits[keep]
        return torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum")

    @staticmethod
    def decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's inputs for teacher forcing, as T5, BART, Marian and M2M100 build them from labels: the
        decoder start token, then labels[:, :-1], -100 read as padding. Passed instead of labels, so the model does not
        compute a mean loss of its own beside this task's (a second log-softmax over [B, T, V] every step)."""
        config = model.config
        start = torch.full_like(labels[:, :1], config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, config.pad_token_id)

    def count(self, batch: dict) -> float:
        if not self.encoder_decoder:
            return self.lm.count(batch)
        return float((batch["labels"] != -100).sum())

    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        """Token-weighted loss over the targets and its perplexity; with a generation metric as train.metric, also
        the generation scores (validation then generates)."""
        result = self.losses(model, features, batch_size)
        if self.recipe.train.metric in schema.GENERATION_METRICS:
            result |= self.generation_scores(model, features, batch_size)[0]
        return result

    def losses(self, model, features: list[dict], batch_size: int) -> dict:
        return token_losses(self, model, features, batch_size)

    def evaluate_final(self, model, rows: list[dict], features: list[dict], batch_size: int, out_dir=None) -> dict:
        """Loss and perplexity; with eval.generate (the default) the generation scores, length statistics of the
        outputs against the references, and the first SAMPLES (prompt, reference, output) in samples.jsonl."""
        with self.autocast(model):
            result = self.losses(model, features, batch_size)
        if self.recipe.eval.generate is None:
            return result
        scores, outputs = self.generation_scores(model, features, batch_size)
        if out_dir is not None:
            io.write_jsonl(Path(out_dir) / "samples.jsonl",
                           [{"prompt": self.source(r), "reference": f["reference"], "output": o}
                            for r, f, o in list(zip(rows, features, outputs))[:SAMPLES]])
        return result | scores

    def generation_scores(self, model, features: list[dict], batch_size: int) -> tuple[dict, list[str]]:
        """(scores of the generated outputs against the features' references, the outputs in order)."""
        done = self.completions(model, [f["prompt_ids"] for f in features], batch_size)
        outputs, references = [c.text for c in done], [f["reference"] for f in features]
        result = schema.scores(references, outputs, self.recipe.eval.rouge_stemmer)
        out_len = [len(self.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs]
        ref_len = [len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
        result |= {"length_ratio": sum(out_len) / max(sum(ref_len), 1),
                   "outputs_at_max_new_tokens": sum(c.finish == "length" for c in done) / max(len(done), 1),
                   "lengths": {"unit": "tokens", "output": schema.percentiles(out_len),
                               "reference": schema.percentiles(ref_len)}}
        return result, outputs

    def prompt_ids(self, messages) -> list[int]:
        """Token ids of a prompt: a conversation (chat; decoder-only) or a source string / row."""
        if isinstance(messages, list):
            if self.encoder_decoder:            # what it answers: the last message, as a source
                return self.tokenizer(self.prompt(messages[-1]["content"])[0], truncation=True,
                                      max_length=self.max_length)["input_ids"]
            return self.lm.prompt_ids(messages)
        prompt = self.prompt(messages)[0]
        if self.encoder_decoder:
            return self.tokenizer(prompt, truncation=True, max_length=self.max_length)["input_ids"]
        return self.lm.prompt_ids([{"role": "user", "content": prompt}])

    def prediction_prompt(self, item) -> tuple[list[int], str]:
        """A string is a source; a row gives its source column. The prediction reports the source as its prompt."""
        return self.prompt_ids(item), self.source(item)

    # --- data doctor -----------------------------------------------------------------------------------
    def data_findings(self, tables: dict) -> tuple[dict, list[str], list[str]]:
        """Source and target lengths and cut shares, pairs whose target is the source, sources with several
        targets (text2text_schema.pair_findings); empty sources or targets are rejected rows (check)."""
        cfg, splits = self.recipe.data, {}
        count = lambda texts: [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False,
                                                                  verbose=False)["input_ids"]] if texts else []
        for split, table in tables.items():
            sources = [r[cfg.source_column] for r in table.rows]
            targets = [r[cfg.target_column] for r in table.rows]
            splits[split] = {"sources": sources, "targets": targets, "origins": table.origins,
                             "source_tokens": count(sources), "target_tokens": count(targets)}
        section, warnings = schema.pair_findings(splits, {"source": self.budget(), "target": self.target_budget()},
                                                 self.recipe.doctor.listed)
        return section, warnings, []


@contextmanager
def head_at(model, keep: torch.Tensor):
    """The model's LM head (its output embeddings) applied only at the positions `keep` [B, T] marks: its input
    [B, T, d] becomes [N, d] (row-major), so the logits come out [N, V], the same rows the full head gives there.
    Encoder-decoder models apply the head to the decoder's last hidden states, at most scaled before it (T5) or
    biased after it (BART's and Marian's final_logits_bias [1, V]); the positions of padded targets, a share of
    every batch, then cost no [d x V] product, log-softmax or their gradients. The head is the output embeddings of
    the first transformers model inside `model` (itself, or under DDP or peft); a module holding none (the exported
    ONNX model export_generate.py scores), one without output embeddings or a head that sees another shape runs as
    it would without this."""
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    head = hf.get_output_embeddings() if hf is not None else None
    if head is None:
        yield
        return

    def rows(_module, args):
        hidden = args[0]                                               # [B, T, d]
        return (hidden[keep], *args[1:]) if hidden.shape[:-1] == keep.shape else None

    handle = head.register_forward_pre_hook(rows)
    try:
        yield
    finally:
        handle.remove()
