"""Pure tensor functions: keep-set selection, attention of a few queries, smoothing, ToMe merging, TS-DTP
task attention, FLOPs. They know no model family and hold no state."""
