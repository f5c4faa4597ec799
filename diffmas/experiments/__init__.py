"""Experiment drivers over the library: the demo (``make demo``), the grounding study, the relay study, and what
they share (presets: the machine, train-once; workers: arms claimed by several one-thread processes, results
committed as they finish)."""
