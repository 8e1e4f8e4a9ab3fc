"""The continual-learning benchmark's own material, not part of the tuner (as PEFT keeps its experiments in
``method_comparison/``): the methods it compares (`baselines`: SpaRTA and its ablations, sequential LoRA, O-LoRA,
OSF, multi-task LoRA), the offline task suites (`suites`) and the loaders of the offline real models (`offline`).

The tools for continual learning with SpaRTA (metrics, harnesses, `train_sequence`) are in `peft_sparta.continual`;
``benchmarks/continual.py`` runs this kit through them.
"""
