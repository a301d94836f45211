"""`python -m transformers_rxt_cli` runs the `rxt` command."""

import sys

from transformers_rxt_cli import main

sys.exit(main())
