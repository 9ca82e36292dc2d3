"""The reference audio LLM (paper section 3.1, 4.1, Table 4): audio frontend (Whisper encoder,
frame stacking, discrete semantic tokens, feature fusion) + any adapter + a transformers causal LM.

Three parts, each importing only the ones above it in this list:

    the model     config, audio, ct2, encoder, semantic, tokenizer, model, assemble, data, corpus/
    training/     the loop (python -m adapter.lalm.train), checkpoints, the run folder, FSDP
    evaluation    evaluate (python -m adapter.lalm.evaluate), transcribe
    studies/      every experiment on trained runs (python -m adapter.lalm.studies.<name>)
    demo          the main job (python -m adapter.lalm.demo): corpus, two runs, their table

(plots.py, matplotlib drawing to files, is shared by the evaluation, the studies and the demo.)
tests/test_layers.py holds the order.
"""
