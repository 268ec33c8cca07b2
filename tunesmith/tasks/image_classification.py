"""Image classification (ResNet, ViT, ConvNeXt, MobileNetV2, EfficientNet via transformers' Auto classes).

Preprocessing is the model's own transformers image processor (PIL backend, no torchvision): it resizes
and crops each image once, at encode time, to uint8 pixels [3, H, W] (data.image_size rescales its sizes;
the processor saved with the model carries them, so `pipeline("image-classification", RUN/model)` sees the
same input). collate applies the processor's rescale and normalization. Training batches are augmented
in `loss` (the only step that sees training batches alone), in plain torch (tunesmith/vision.py), with a
generator seeded from the global torch RNG: checkpoints restore that RNG, so a resumed run is exact.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tunesmith import metrics, vision
from tunesmith.errors import TunesmithError
from tunesmith.io import write_jsonl
from tunesmith.tasks.base import Features, model_device
from tunesmith.tasks.classification import Classification, captum_attr
from tunesmith.tasks.hf import load_hf, load_image_processor, load_saved

CHUNK = 256                 # images per image-processor call
MISCLASSIFIED = 100         # most confident mistakes listed in misclassified.jsonl
SALIENCY_GRID = 32          # explain(): the saliency map in the JSON is pooled to at most this many cells a side


class ImageClassification(Classification):
    name = "image-classification"
    input_key = "image"
    near_method = "embedding"       # Task.key is a pixel hash: near duplicates need the model's embeddings
    explainable = True

    @property
    def path_columns(self) -> tuple[str, ...]:
        return (self.recipe.data.image_column,)

    # --- data ---------------------------------------------------------------------------------------
    def check(self, row: dict, split: str) -> str | None:
        return self.check_input(row) or self.check_label(row, split)

    def check_input(self, item) -> str | None:
        col = self.recipe.data.image_column
        value = item.get(col) if isinstance(item, dict) else item
        if value in (None, ""):
            return f"missing image (column '{col}')"
        return vision.check_image(value)

    def key(self, row: dict) -> str:
        return vision.image_key(row[self.recipe.data.image_column])

    def length(self, feature: dict) -> int:
        return 1                                    # every image has the model's input size

    def encode(self, rows: list[dict]) -> list[dict]:
        """uint8 pixels [3, H, W] as the image processor resizes and crops them, and the label id if any."""
        col, label_col = self.recipe.data.image_column, self.recipe.data.label_column
        out = Features()
        for s in tqdm(range(0, len(rows), CHUNK), desc="images", unit="chunk", mininterval=1.0,
                      disable=len(rows) <= 4 * CHUNK, leave=False):
            chunk = rows[s:s + CHUNK]
            try:
                images = [vision.load_image(r[col]) for r in chunk]
            except Exception as e:                  # check() decoded these already: the files changed since
                raise TunesmithError(f"image became unreadable after the data check: {e}") from None
            pixels = self.processor(images, do_rescale=False, do_normalize=False, return_tensors="np")
            pixels = torch.from_numpy(np.asarray(pixels["pixel_values"]).round().clip(0, 255).astype(np.uint8))
            for p, r in zip(pixels, chunk):
                labelled = r.get(label_col) not in (None, "")
                out.append({"pixels": p, **({"labels": self.label_id(r)} if labelled else {})})
        return out

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # pixel_values: [B, 3, H, W] normalized as the processor does; labels: [B]
        pixels = torch.stack([f["pixels"] for f in features]).float()
        scale, shift = self.normalization
        batch = {"pixel_values": pixels * scale + shift}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch

    # --- model --------------------------------------------------------------------------------------
    def load_processor(self, source, revision):
        return load_image_processor(source, revision, self.trust_remote_code,
                                    "ViTImageProcessorPil(size=..., image_mean=..., image_std=...)"
                                    ".save_pretrained(path)")

    @property
    def normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each [3, 1, 1]: uint8 pixels * scale + shift = the processor's normalised input."""
        return vision.normalization(self.processor)

    def setup(self, source=None) -> None:
        super().setup(source)
        if source is None and self.recipe.data.image_size:     # training: the recipe's size (saved with the model)
            vision.set_input_size(self._processor, self.recipe.data.image_size)

    def load_model(self):
        from transformers import AutoModelForImageClassification

        model, _ = load_hf(AutoModelForImageClassification, self.recipe.model, **self.label_config)
        for m in model.modules():
            # transformers' MobileNetV2 keeps TensorFlow's BatchNorm momentum (0.997, the share of the old running
            # statistics); in PyTorch's convention that would keep only the latest batch: use PyTorch's 0.1
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.momentum or 0) > 0.5:
                m.momentum = 0.1
        return model

    def load_trained(self, folder):
        from transformers import AutoModelForImageClassification

        model = load_saved(self, AutoModelForImageClassification, folder)
        self.set_labels([model.config.id2label[i] for i in range(model.config.num_labels)])
        return model

    # --- training and evaluation --------------------------------------------------------------------
    def loss(self, model, batch: dict) -> torch.Tensor:
        aug = self.recipe.augment
        if not aug.enabled:
            return super().loss(model, batch)
        # one draw from the global RNG per batch: a checkpoint restores that RNG, so resume replays these
        g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        pv = batch["pixel_values"]
        scale, shift = (t.to(pv) for t in self.normalization)
        x = ((pv - shift) / scale / 255).clamp(0, 1)                   # back to [0, 1] pixels
        x = vision.augment(x, aug, g)
        targets = F.one_hot(batch["labels"], len(self.names)).float()  # [B, C]; MixUp/CutMix mix them
        x, targets = vision.mix(x, targets, aug, g)
        logits = model(pixel_values=x * 255 * scale + shift).logits
        weight = self.weights.to(logits.device) if self.weights is not None else None
        smoothing = self.recipe.train.label_smoothing
        # a sum, divided by count() (the examples' class weights before mixing: equal to the mixed ones in expectation)
        return F.cross_entropy(logits.float(), targets, weight=weight, label_smoothing=smoothing, reduction="sum")

    def final_metrics(self, rows: list[dict], labels: torch.Tensor, probs: torch.Tensor, out_dir) -> dict:
        """Top-k accuracy; out_dir: write misclassified.jsonl there, the most confident mistakes first ("row" is
        the example's position in the evaluated rows, data/test.jsonl)."""
        pred = probs.argmax(-1)
        result = metrics.top_k_accuracy(labels.numpy(), probs.numpy())
        if out_dir is not None:
            confidence = probs.max(-1).values
            wrong = sorted((i for i in range(len(rows)) if pred[i] != labels[i]), key=lambda i: -float(confidence[i]))
            col = self.recipe.data.image_column
            write_jsonl(Path(out_dir) / "misclassified.jsonl",
                        [{"row": i, "image": vision.describe(rows[i][col]), "label": self.names[int(labels[i])],
                          "predicted": self.names[int(pred[i])], "confidence": round(float(confidence[i]), 4),
                          "label_probability": round(float(probs[i, labels[i]]), 4)} for i in wrong[:MISCLASSIFIED]])
            result["misclassified"] = len(wrong)
        return result

    def explain(self, model, inputs: list) -> list[dict]:
        """Saliency (captum): |d logit(predicted) / d pixel|, the largest over colour channels, scaled to [0, 1];
        the overlay is the model's input image with the saliency in red on top (PNG data URI)."""
        from PIL import Image

        attr = captum_attr()
        col = self.recipe.data.image_column
        rows = [{col: x[col] if isinstance(x, dict) else x} for x in inputs]
        features = self.encode(rows)
        batch = self.collate([{"pixels": f["pixels"]} for f in features])["pixel_values"].to(model_device(model))
        forward = lambda x: model(pixel_values=x).logits.float()               # [B, C]
        with torch.no_grad():
            probs = forward(batch).softmax(-1)
        targets = probs.argmax(-1)
        with torch.enable_grad():
            grads = attr.Saliency(forward).attribute(batch.requires_grad_(), target=targets)   # [B, 3, H, W]
        maps = grads.abs().amax(1)
        maps = (maps / maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]).cpu()            # [B, H, W] in [0, 1]
        out = []
        for row, f, m, p, t in zip(rows, features, maps, probs, targets):
            side = max(m.shape) // SALIENCY_GRID + (max(m.shape) % SALIENCY_GRID > 0)
            grid = F.avg_pool2d(m[None, None], side, ceil_mode=True)[0, 0]
            heat = (m.numpy() * 200).astype(np.uint8)                          # opacity of the red: 0..78%
            pixels = f["pixels"].permute(1, 2, 0).numpy()                     # [H, W, 3] uint8
            red = np.zeros_like(pixels)
            red[..., 0] = 255
            overlay = Image.composite(Image.fromarray(red), Image.fromarray(pixels), Image.fromarray(heat))
            buf = io.BytesIO()
            overlay.save(buf, format="PNG")
            out.append({"input": vision.describe(row[col]), "predicted": self.names[int(t)],
                        "probability": round(float(p[t]), 6), "saliency": grid.round(decimals=4).tolist(),
                        "overlay": vision.data_uri(buf.getvalue())})
        return out

    def export_outputs(self) -> dict[str, dict[int, str]]:
        return {"logits": {0: "batch"}}                                                # [B, C]

    def export_inputs(self) -> dict[str, tuple[torch.Tensor, dict[int, str]]]:
        side = vision.input_size(self.processor)
        pixels = torch.zeros((2, 3, side, side), dtype=torch.uint8)
        return {"pixel_values": (self.collate([{"pixels": p} for p in pixels])["pixel_values"], {0: "batch"})}

    def predict(self, model, inputs: list) -> list[dict]:
        col = self.recipe.data.image_column
        rows = [{col: x[col] if isinstance(x, dict) else x} for x in inputs]
        for r in rows:
            reason = vision.check_image(r[col])
            if reason:
                raise TunesmithError(reason)
        features = [{"pixels": f["pixels"]} for f in self.encode(rows)]
        with torch.no_grad():
            return self.predictions(self.logits(model, features, self.recipe.eval.batch_size))
