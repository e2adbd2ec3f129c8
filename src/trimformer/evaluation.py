"""Not part of the library: the evaluation harness lives in the lab part, `trimformer_lab.evaluation`."""

raise ImportError('trimformer.evaluation is trimformer_lab.evaluation, in the lab part (pip install -e ".[lab]")')
