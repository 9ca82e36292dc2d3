"""Experiments on the reference LALM, each a command (`python -m adapter.lalm.studies.<name> --help`):

experiment    the shared setting (corpus, sizes, budget) and train_and_evaluate, used by all below
seeds         the same comparison over several seeds, with seed-level paired intervals
capacity      MoE vs dense across adapter widths on a frozen, text-trained backbone (backbone.py)
ablation      the paper's Table 2/3 ablations
interference  joint vs per-category training (the gradient-conflict hypothesis)
analysis      section 5's analyses on trained runs: activation heatmaps, gradient cosines, influence
diagnose      why an adapter learns less: probes, router entropy and churn, per-category losses
report        everything above on one setting, as one Markdown report
curves        training curves of any runs; memory: per-GPU training memory, DDP vs FSDP
paired        paired differences, bootstrap intervals and McNemar's test (a library, no command)
"""
