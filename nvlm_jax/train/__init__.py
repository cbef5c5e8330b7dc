"""Training: staged optimisation, the step, the loop, checkpoints, metrics.

One concept per module:
  freeze       which params each (arch, stage) trains (paper Tables 10–11); partition/combine
  optim        AdamW + warmup/cosine-to-min schedule + clipping + weight-decay mask
  step         TrainState, masked token cross-entropy, the jitted step (accumulation, skip on NaN)
  loop         the training loop (resume, logging, evaluation, checkpoints, non-finite stop)
  checkpoint   Orbax CheckpointManager wrapper (async, atomic, keep-last + keep-best) and the
               generic params restore for converted checkpoints
  metrics      throughput / MFU arithmetic, console + JSONL + TensorBoard logger
  tensorboard  TensorFlow-free event-file writer and reader
  flops        analytic FLOPs of a batch (forward and training)
  evaluate     held-out exact match by greedy decoding
  launch       run config (ml_collections) → model, data, evaluator → `loop.train`

Entry points: `experiments/train.py` (absl launcher) and `experiments/main_job.py`.
"""
