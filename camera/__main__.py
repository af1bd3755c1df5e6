"""``python -m camera`` = ``smartcam-edge``."""

import sys

from camera.cli import main

sys.exit(main())
