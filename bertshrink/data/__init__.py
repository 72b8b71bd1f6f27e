"""Data: sources (packaged, Hub, local files), seeded splits, Great Expectations validation, and the
training rows that calibrate static quantization."""
