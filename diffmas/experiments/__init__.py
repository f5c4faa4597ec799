"""Experiment drivers over the library: the grounding study, the relay study, and what they share (presets:
the machine, the mixed-precision decision, train-once; workers: arms claimed by several one-thread processes,
results committed as they finish). The demo (``diffmas.demo``) uses the same presets."""
