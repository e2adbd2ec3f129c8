"""Calibration of a model's pruning schedule, measured on the model itself (docs/calibration.md).

`prompts`: synthetic facts planted in standard-library docstring prose (text no evaluation uses);
`evidence`: the last-query scores of every layer in one full forward, and how many of the facts' tokens a
layer (or a schedule) keeps; `search`: candidate schedules within a work target, screened on those scores and
verified with real trimmed forwards (first-answer-token KL, evidence kept, greedy answer agreement), written
as a preset; `tune`: schedules of increasing aggressiveness timed side by side with the full model, the best
fidelity among those reaching a speedup target.
"""
