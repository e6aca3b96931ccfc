import sys

from dtp_ds.train.main import main

sys.exit(main())
