"""Causal LM (GPT-like) chat and instruction tuning: the model learns to write the assistant's turns.

Rows: a `messages` column (list of {role, content}, or its JSON text) or `prompt`/`response` columns.
The tokenizer's chat template (or data.chat_template) renders each conversation; only assistant turns are
trained, each through its end-of-turn (EOS) token, so the model learns what to answer and when to stop:
  input_ids: [T]    labels: [T], -100 on system/user turns and template markup
Padding is found by length, never by token id, so a tokenizer whose pad token is its EOS still trains EOS.

Packing (train.packing): examples go best-fit-decreasing into rows of train.pack_length tokens; position_ids
restart at 0 for each example and the batch carries no 2D attention mask, from which transformers builds a
block-diagonal causal mask (masking_utils.find_packed_sequence_indices; needs no KV cache, hence
use_cache=False). No token attends across examples, and the first token of each example is never a label, so a
packed row's loss equals the token-weighted mean loss of its examples run one by one.
On CPU a packed row's attention runs per example (segment_attention below) instead of over the whole row under
that mask: the same result, without the row-length-squared work between examples.
"""
from __future__ import annotations

import bisect
import contextvars
import json
import math
import sys

import torch

from tunesmith.errors import TunesmithError
from tunesmith.tasks.base import Features, batches, model_device
from tunesmith.tasks.generation import Generative
from tunesmith.tasks.hf import load_hf, load_saved
from tunesmith.tasks.text import Tokenized

GENERATION_METRICS = ("exact_match", "rouge_l")     # train.metric values that need generated answers
PROBE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]

# Why hand-written: a packed row of ~8 examples under transformers' block-diagonal mask costs attention over
# row-length^2 query/key pairs, 8x the pairs that matter; CPU SDPA has no varlen kernel (flash-attn's is CUDA-only).
# Per example, SDPA runs causal with no mask (its flash kernel on CPU). The segments of the batch being run are
# set by CausalLM.loss (a context variable: they reach every attention call of any model without relying on
# the model to pass extra forward arguments down); unset, or off CPU, it is transformers' SDPA with the mask.
SEGMENT_ATTENTION = "tunesmith_segments"
SEGMENTS: contextvars.ContextVar = contextvars.ContextVar(SEGMENT_ATTENTION, default=None)


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of a packed batch, the [start, end) of each example: where position_ids restart at 0 (the
    padding after a row's last example is one more segment, attended within itself and never labelled)."""
    width = position_ids.shape[1]
    out = []
    for row in position_ids.tolist():
        starts = [t for t, p in enumerate(row) if p == 0] + [width]
        out.append(list(zip(starts[:-1], starts[1:])))
    return out


def segment_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function. query: [B, H, T, D]; key, value: [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = SEGMENTS.get()
    if rows is None or query.device.type != "cpu" or query.shape[2] != key.shape[2] \
            or getattr(module, "sliding_window", None) or kwargs.get("sliding_window"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    out = [torch.cat([sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                             value[b:b + 1, :, s:e], None, is_causal=True, **kwargs)[0]
                      for s, e in row], dim=1) for b, row in enumerate(rows)]
    return torch.cat(out, dim=0), None


def use_segment_attention(model) -> bool:
    """Switch an SDPA model that takes transformers' attention functions to segment_attention; False if not."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa" or not model._can_set_attn_implementation():
        return False
    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)    # the mask SDPA gets when not per segment
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return True


class CausalLM(Tokenized, Generative):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    input_key = "prompt"
    chats = True                    # prediction "text" and generation: Generative

    # --- rows -> conversations -----------------------------------------------------------------------
    def messages(self, row: dict) -> list[dict]:
        """The row's conversation as [{role, content}]; ValueError says what is wrong with the row."""
        cfg = self.recipe.data
        if row.get(cfg.messages_column) is not None:
            msgs = row[cfg.messages_column]
            if isinstance(msgs, str):
                try:
                    msgs = json.loads(msgs)
                except json.JSONDecodeError as e:
                    raise ValueError(f"column '{cfg.messages_column}' is not valid JSON ({e})") from None
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"column '{cfg.messages_column}' must be a non-empty list of {{role, content}}")
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                        or not isinstance(m.get("content"), str):
                    raise ValueError(f"message {i} must be an object with string 'role' and 'content', got {m!r}")
            return [{"role": m["role"], "content": m["content"]} for m in msgs]
        prompt = row.get(cfg.prompt_column)
        if prompt is None:
            raise ValueError(f"no '{cfg.messages_column}' column and no '{cfg.prompt_column}' column")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"column '{cfg.prompt_column}' must be a non-empty string, got {prompt!r}")
        msgs = [{"role": "user", "content": prompt}]
        response = row.get(cfg.response_column)
        if response is not None and response != "":
            if not isinstance(response, str):
                raise ValueError(f"column '{cfg.response_column}' must be a string, got {type(response).__name__}")
            msgs.append({"role": "assistant", "content": response})
        return msgs

    @staticmethod
    def split_answer(msgs: list[dict]) -> tuple[list[dict], str | None]:
        """(the conversation before the last assistant turn, that turn's text); no assistant: (msgs, None)."""
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        return (msgs, None) if last is None else (msgs[:last], msgs[last]["content"])

    def check(self, row: dict, split: str) -> str | None:
        try:
            msgs = self.messages(row)
            if not any(m["role"] == "assistant" for m in msgs):
                return "no assistant turn: every label would be masked, nothing to learn or score"
            ids, labels, cut = self.encode_one(msgs)
        except ValueError as e:
            return str(e)
        if all(x == -100 for x in labels[1:]):               # position 0 is never predicted
            if cut:
                return (f"every assistant token lies beyond data.max_length={self.recipe.data.max_length} "
                        f"(the conversation has {self.full_length(msgs)} tokens): raise it or shorten the prompt")
            return "the chat template leaves no assistant token: every label would be masked"
        return None

    def check_input(self, item) -> str | None:
        if isinstance(item, dict):
            try:
                self.messages(item)
            except ValueError as e:
                return str(e)
            return None
        return super().check_input(item)

    def key(self, row: dict) -> str:
        try:
            prompt, _ = self.split_answer(self.messages(row))
        except ValueError:
            return json.dumps(row, sort_keys=True, default=str)
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)

    # --- tokenizer and template ----------------------------------------------------------------------
    def load_processor(self, source, revision=None):
        """The tokenizer, checked: a chat template (data.chat_template overrides), an EOS token that ends each
        assistant turn (or the model never learns to stop), a pad token (EOS is safe: padding goes by length)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=self.trust_remote_code)
        if self.recipe.data.chat_template:
            tok.chat_template = self.recipe.data.chat_template
        if not tok.chat_template:
            raise TunesmithError(f"{source}: the tokenizer has no chat template; set data.chat_template to a Jinja "
                             "template that ends every assistant turn with {{ eos_token }}")
        if tok.eos_token is None:
            raise TunesmithError(f"{source}: the tokenizer has no EOS token; the model could not learn to stop")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token        # safe: padding is masked by length, never by id
        text, spans = self.render(PROBE, tok)
        if tok.eos_token not in text[spans[0][0]:spans[0][1]]:
            raise TunesmithError(f"the chat template does not end an assistant turn with the EOS token "
                             f"{tok.eos_token!r}, so the model would never learn to stop: add {{{{ eos_token }}}} "
                             f"after the assistant's content in data.chat_template")
        return tok

    def render(self, msgs: list[dict], tok=None) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text, and the character spans [start, end) of the assistant turns, each from
        its first content character through its EOS token (template text after EOS is not a label)."""
        tok = tok or self.tokenizer

        def text(part, prompt=False):
            try:
                return tok.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)
            except Exception as e:                   # jinja2 errors: raise_exception() in templates
                raise ValueError(f"the chat template cannot render this conversation: {e}") from None

        full, spans = text(msgs), []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head, upto = text(msgs[:i], prompt=True) if i else "", text(msgs[:i + 1])
            if not (full.startswith(upto) and upto.startswith(head)):
                raise ValueError(f"the chat template renders message {i} differently alone and in the whole "
                                 "conversation, so its assistant tokens cannot be found")
            end = upto.rfind(tok.eos_token, len(head))
            spans.append((len(head), end + len(tok.eos_token) if end >= 0 else len(upto)))
        return full, spans

    def full_length(self, msgs: list[dict]) -> int:
        return len(self.tokenizer(self.render(msgs)[0], add_special_tokens=False)["input_ids"])

    def encode_one(self, msgs: list[dict]) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated) of one conversation, cut at data.max_length."""
        tok = self.tokenizer
        text, spans = self.render(msgs)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        labels = [t if any(a <= s < b for a, b in spans) else -100 for t, (s, _) in zip(ids, enc["offset_mapping"])]
        limit = self.recipe.data.max_length
        return ids[:limit], labels[:limit], len(ids) > limit

    def prompt_ids(self, msgs: list[dict]) -> list[int]:
        """Token ids of the conversation followed by the template's assistant header (a generation prompt)."""
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    # --- features ------------------------------------------------------------------------------------
    def encode(self, rows: list[dict]) -> list[dict]:
        """One feature per conversation, or packed rows of several (train.packing)."""
        out = [self.encode_one(self.messages(r)) for r in rows]
        features = [{"input_ids": ids, "labels": labels} for ids, labels, _ in out]
        return Features(self.pack(features) if self.recipe.train.packing else features,
                        truncated=sum(cut for _, _, cut in out), rows=rows)

    def length_stats(self, rows: list[dict], features: list[dict]) -> dict:
        """Per conversation (features may be packed, so computed from rows): tokens kept and before the cut,
        trained tokens, and which conversations train nothing or lost their final EOS to the cut."""
        eos = self.tokenizer.eos_token_id
        stats = {"kept": [], "lengths": [], "trained": [], "all_masked": [], "missing_end": []}
        for i, row in enumerate(rows):
            msgs = self.messages(row)
            ids, labels, cut = self.encode_one(msgs)
            trained = [y for y in labels[1:] if y != -100]
            stats["kept"].append(len(ids))
            stats["lengths"].append(self.full_length(msgs) if cut else len(ids))
            stats["trained"].append(len(trained))
            if not trained:
                stats["all_masked"].append(i)
            elif trained[-1] != eos:
                stats["missing_end"].append(i)
        return stats

    def pack(self, features: list[dict]) -> list[dict]:
        """Best-fit decreasing into rows of pack_length tokens; each row keeps its examples' boundaries in
        position_ids (restarting at 0) and masks each example's first label (nothing before it may predict it)."""
        cap = self.recipe.train.pack_length or self.recipe.data.max_length
        rows: list[list[dict]] = []
        free: list[tuple[int, int]] = []                  # sorted (room left, row index)
        for f in sorted(features, key=lambda f: -len(f["input_ids"])):
            n = len(f["input_ids"])
            k = bisect.bisect_left(free, (n, -1))          # the row with the least room that still fits
            if k < len(free):
                room, r = free.pop(k)
            else:                                          # a new row (an example longer than cap gets its own)
                room, r = max(cap, n), len(rows)
                rows.append([])
            rows[r].append(f)
            bisect.insort(free, (room - n, r))
        packed = []
        for group in rows:
            packed.append({"input_ids": [t for f in group for t in f["input_ids"]],
                           "labels": [t for f in group for t in [-100] + f["labels"][1:]],
                           "position_ids": [p for f in group for p in range(len(f["input_ids"]))]})
        if features:
            fill = sum(len(f["input_ids"]) for f in features) / (len(packed) * cap)
            print(f"packing: {len(features):,} examples into {len(packed):,} rows of <= {cap} tokens "
                  f"({100 * fill:.0f}% full)", file=sys.stderr)     # stderr: `tunesmith eval` prints JSON
        return packed

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # input_ids, labels: [B, T] right-padded to the longest; labels -100 on padding.
        # unpacked: attention_mask [B, T]; packed: position_ids [B, T] (padding forms its own block)
        width = self.padded(max(len(f["input_ids"]) for f in features))      # train.pad_multiple
        ids = torch.full((len(features), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        packed = "position_ids" in features[0]
        extra = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            if packed:
                extra[i, :n] = torch.tensor(f["position_ids"])
                extra[i, n:] = torch.arange(width - n)
            else:
                extra[i, :n] = 1
        return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}

    # --- model ---------------------------------------------------------------------------------------
    def load_model(self):
        from transformers import AutoModelForCausalLM

        model = load_hf(AutoModelForCausalLM, self.recipe.model)[0]
        if self.recipe.train.packing:
            use_segment_attention(model)
        return model

    def load_trained(self, folder):
        from transformers import AutoModelForCausalLM

        return load_saved(self, AutoModelForCausalLM, folder)

    def save(self, model, folder) -> None:
        # pipeline("text-generation") and generate() stop at the EOS the template ends each turn with
        model.generation_config.eos_token_id = self.tokenizer.eos_token_id
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        super().save(model, folder)

    # --- training and evaluation ---------------------------------------------------------------------
    def loss(self, model, batch: dict) -> torch.Tensor:
        """Summed cross-entropy over the batch's label tokens, with the LM head applied only where a label
        follows: the head over the vocabulary is a large share of a small model's compute, and most positions
        are prompt. No KV cache while training."""
        logits, target, _ = label_logits(model, batch)
        return torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")

    def count(self, batch: dict) -> float:
        """Label tokens (what HF's shifted causal-LM loss averages over)."""
        return float((batch["labels"][:, 1:] != -100).sum())

    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        """Token-weighted loss over the assistant tokens, and its perplexity; when train.metric is a generation
        metric (epochs: auto's default with eval.generate), also exact match and ROUGE-L of answers generated for
        the rows the features came from (Features.rows)."""
        result = token_losses(self, model, features, batch_size)
        rows = features.rows if isinstance(features, Features) else None
        if self.recipe.train.metric in GENERATION_METRICS and rows is not None:
            result |= self.answers(model, rows, batch_size)
        return result

    def evaluate_final(self, model, rows: list[dict], features: list[dict], batch_size: int, out_dir=None) -> dict:
        """Loss and perplexity; with eval.generate also exact match and ROUGE-L of generated answers against
        each row's last assistant turn, and the first samples in out_dir/samples.jsonl."""
        with self.autocast(model):
            result = token_losses(self, model, features, batch_size)
        if self.recipe.eval.generate is None:
            return result
        return result | self.answers(model, rows, batch_size, out_dir)

    def answers(self, model, rows: list[dict], batch_size: int, out_dir=None) -> dict:
        """exact_match and rouge_l of the answers generated for `rows` against each one's last assistant turn."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):     # validation under DDP: the model
            model = model.module
        prompts, refs = zip(*(self.split_answer(self.messages(r)) for r in rows)) if rows else ((), ())
        return self.generation_metrics(model, list(prompts), list(refs), batch_size, out_dir)

    def prediction_prompt(self, item) -> tuple[list[int], str]:
        """A bare string is one user message; a row gives its conversation up to its last assistant turn. The
        prediction reports the last message before the answer as its prompt."""
        msgs = self.split_answer([{"role": "user", "content": item}] if isinstance(item, str) else
                                 self.messages(item))[0]
        return self.prompt_ids(msgs), msgs[-1]["content"] if msgs else ""


def label_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, V], targets [N], where [B, T-1] bool) at the N positions followed by a label, in row-major
    order; batch: input_ids and labels [B, T], attention_mask or position_ids. No KV cache."""
    target = batch["labels"][:, 1:]                          # [B, T-1]: position t predicts token t+1
    keep = torch.nn.functional.pad(target != -100, (0, 1))   # [B, T] bool: positions followed by a label
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "reference")}
    token = SEGMENTS.set(segments(batch["position_ids"])) if "position_ids" in batch else None
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits   # [N, V], N label tokens
    except TypeError:                    # a model without logits_to_keep: fails before computing anything
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep[:, :-1]]
    finally:
        if token is not None:
            SEGMENTS.reset(token)
    where = keep[:, :-1]
    return logits, target[where], where


def token_losses(task, model, features: list[dict], batch_size: int) -> dict:
    """Loss weighted by label tokens (task.loss sums over a batch, task.count counts its label tokens) and its
    perplexity: causal-lm's answers, text2text's targets."""
    total, count = 0.0, 0.0
    for _, batch in batches(task, features, batch_size, model_device(model)):
        total += float(task.loss(model, batch))
        count += task.count(batch)
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "label_tokens": int(count)}
