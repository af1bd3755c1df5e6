"""``python -m models build | eval`` (same as ``smartcam-model``)."""

import sys

from models.cli import main

sys.exit(main())
