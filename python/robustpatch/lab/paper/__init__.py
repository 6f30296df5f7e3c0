"""The paper's own protocol (issue 16 part B) on Fashion-MNIST: fixed severity, all-corrupted
robust twins with the best corrupted-validation checkpoint, the first k conv tensors, the
official (α/n)² scaling and per-tensor linear quantization, controls beside every arm, and
verdicts pre-registered in :mod:`.verdicts` judged on intervals over fine-tune seeds."""
