"""``python -m services.k8s_validate k8s``: see the package docstring."""

import sys

from . import main

sys.exit(main())
