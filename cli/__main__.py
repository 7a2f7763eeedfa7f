"""`python -m llmprune.cli`."""

import sys

from .main import main

sys.exit(main())
