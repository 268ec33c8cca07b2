"""Shipping a run's model: ONNX / int8 export with its gate (export), knowledge distillation into a smaller
student (distill)."""
