"""`python -m llm_twin_features.cli`."""

import sys

from llm_twin_features.cli import main

sys.exit(main())
