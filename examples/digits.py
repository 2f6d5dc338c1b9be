"""pomfx on real handwritten digits (scikit-learn's bundled ``load_digits``, no download).

This is the demo that ``make demo`` and ``pomfx demo`` run (the code lives in :mod:`pomfx.demo`):
a small BN CNN trained with plain ``torch.optim.SGD`` and, from the same initialisation and with
the same hyperparameters, converted with ``pomfx.convert(scheme="pio")`` and trained with
``pomfx.FGSGD``; the ablations ``renorm=False`` and single manifolds (sp, st); 3 seeds. It prints
the test errors (mean ± std) with the paper's Table 2 bounds of both models, writes
``out/digits_demo.png`` and ``out/digits_demo.json``, and exports the converted model to ONNX,
verified with onnxruntime. ``--quick`` for a one-minute run, ``--help`` for the options.
"""

from __future__ import annotations

import sys

from pomfx.demo import (  # noqa: F401  (re-exported: the building blocks of the experiment)
    Config,
    evaluate,
    load_digits_split,
    main,
    make_model,
    run_pair,
    train,
)

if __name__ == "__main__":
    sys.exit(main())
