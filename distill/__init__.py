"""Distillation, ONNX export, quantization and engine build for the edge."""
