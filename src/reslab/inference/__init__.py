"""The inference layer: evaluation, prediction (files to rows; the --output writer), Grad-CAM, ONNX Runtime backends."""
