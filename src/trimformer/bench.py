"""Not part of the library: the benchmarks live in the lab part, `trimformer_lab.bench`."""

raise ImportError('trimformer.bench is trimformer_lab.bench, in the lab part (pip install -e ".[lab]")')
