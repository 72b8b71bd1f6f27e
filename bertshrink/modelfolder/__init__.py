"""The model-folder format: the bottom layer every other package builds on.

A model is a folder: weights (safetensors, a torchao ``pytorch_model.bin``, ``model.onnx`` or the
floor's ``floor.npz`` + ``floor.json``), ``config.json``, tokenizer files and ``bertshrink.json``
(``meta.ModelMeta``).
``files`` names the files, ``meta`` reads and writes the metadata and writes folders atomically,
``load`` and ``runners`` open whatever a folder holds, ``size`` measures it on disk.
"""
