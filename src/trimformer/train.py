"""Not part of the library: training of the learned pruners lives in the lab part, `trimformer_lab.train`."""

raise ImportError('trimformer.train is trimformer_lab.train, in the lab part (pip install -e ".[lab]")')
