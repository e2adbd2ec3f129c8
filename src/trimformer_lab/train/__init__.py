"""Training for learned pruners (SDTP, arXiv 2504.04514).

* `saliency`: stage 1, per-token saliency |sum_d dL/dh * h| at every layer, backbone frozen;
* `pruner`: stage 2, one two-layer MLP per pruning stage trained to predict it (MSE + ranking loss);
* `data`: calibration text (PG essays, LongBench prompts with their answers, any text files).

The trained network and the scorer that uses it at inference are in `trimformer.pruners.sdtp` and `trimformer.scorers.sdtp`.
"""
