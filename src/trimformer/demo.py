"""Not part of the library: the demo lives in the lab part, `trimformer_lab.demo`."""

raise ImportError('trimformer.demo is trimformer_lab.demo, in the lab part (pip install -e ".[lab]")')
