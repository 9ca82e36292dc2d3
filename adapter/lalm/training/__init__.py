"""Training the reference LALM, in the order a reader needs it:

    loop.py        train(cfg): the loop, one optimizer step (train_step), and the run's start-up
    setup.py       seeds, devices and processes, what trains, the schedule, autocast, the codebook
    checkpoint.py  atomic checkpoints, resuming, and load_trained (a run's model, for evaluation)
    runs.py        the run folder's files (RunFolder), its log, its lock, resumable config changes
    parallel.py    FSDP2 sharding and sharded checkpoints

The command line is adapter/lalm/train.py (`python -m adapter.lalm.train`).
"""
