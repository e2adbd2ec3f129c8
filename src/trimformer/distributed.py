"""Not part of the library: data-parallel evaluation lives in the lab part, `trimformer_lab.distributed`."""

raise ImportError('trimformer.distributed is trimformer_lab.distributed, in the lab part (pip install -e ".[lab]")')
