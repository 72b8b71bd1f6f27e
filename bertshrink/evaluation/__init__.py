"""Evaluation: accuracy, size, latency and memory of any model folder, the machine they were measured
on, behaviour next to the teacher, the TF-IDF floor, and repeats over seeds."""
