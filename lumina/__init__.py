"""LuminaAI's library: the code the stages share, one module per subject.

  vocab       the characters and the chat template (no torch)
  config      the CONFIG convention: --key=value, --help, types and ranges (no torch)
  data        reading every input format, OASST threading, atomic writes (no torch)
  model       the transformer
  engine      the KV cache, sampling, rows and their batched step, generation, beam search
  checkpoint  the .pth contract, int8 weights
  adapt       LoRA, chat-token training, vocabulary expansion
  device      the device rule
  optim       Muon, AdamW and the learning-rate schedule
  training    the runtime, the data cache, the step, the out-of-memory back-off, the Trainer
  evaluate    val bits/char, the end-of-turn rate, probe replies

Importing this package imports nothing heavy: each module is imported by name where it is used.
"""
