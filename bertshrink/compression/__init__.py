"""Compression: pruning (layers, heads, FFN, vocabulary, magnitude), ONNX export, post-training
quantization (ONNX Runtime, torchao), and the recipe runner that chains them."""
