"""The continual-learning and speed benchmarks of peft-sparta: in the repository, not in the wheel (as PEFT keeps its
experiments in ``method_comparison/``).

The kit: the methods the continual benchmark compares (`baselines`: SpaRTA and its ablations, sequential LoRA, O-LoRA,
OSF, multi-task LoRA), the offline task suites (`suites`), the loaders of the offline real models (`offline`) and the
helpers the scripts share (`common`: timing, provenance, tables). The scripts run as modules from the repository
root, e.g. ``python -m benchmarks.continual --suite minilm``; results go to ``benchmarks/results``.

The tools for continual learning with SpaRTA that users call (metrics, harnesses, `train_sequence`, calibration,
`RoutingRecorder`) are in `peft_sparta.continual`; the scripts run this kit through them.
"""
