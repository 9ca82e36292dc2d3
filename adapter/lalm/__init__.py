"""The reference audio LLM (paper section 3.1, 4.1, Table 4): audio frontend (Whisper encoder,
frame stacking, discrete semantic tokens, feature fusion) + any adapter + a transformers causal LM,
with its data pipeline, training loop and evaluation."""
