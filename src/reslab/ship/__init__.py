"""The ship layer: export (ONNX, TorchScript), int8 quantization, the inference benchmark, the HTTP server."""
