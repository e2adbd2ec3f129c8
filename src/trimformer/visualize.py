"""Not part of the library: the token-map plots live in the lab part, `trimformer_lab.visualize`."""

raise ImportError('trimformer.visualize is trimformer_lab.visualize, in the lab part (pip install -e ".[lab]")')
