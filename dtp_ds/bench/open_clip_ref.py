"""open_clip's own trainer with dtp_ds's model configs registered: the reference side of
tools/bench_engine (run under torchrun)."""
import sys

from open_clip_train.main import main

import dtp_ds  # noqa: F401  (registers dtp_ds model names with open_clip)

if __name__ == "__main__":
    main(sys.argv[1:])
