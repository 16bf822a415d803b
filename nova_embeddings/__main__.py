"""``python -m nova_embeddings ...`` is ``nova-embeddings ...``."""

import sys

from .cli import main

sys.exit(main())
