"""trimformer's lab: evaluation harnesses (needle, LongBench, fidelity, GLUE, ImageNet), training of the
learned pruners (SDTP, TS-DTP, merge distillation), benchmarks, the demo and plots. It imports the library
(`trimformer`), never the other way round; its commands join the `trimformer` CLI through the
`trimformer.commands` entry points. Install with `pip install -e ".[lab]"`."""
