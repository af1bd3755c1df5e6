"""``python -m cloud_sink``: the same as ``smartcam-sink``."""

import sys

from cloud_sink.cli import main

sys.exit(main())
