"""``python -m mmpost`` (and ``accelerate launch -m mmpost``) run the ``mmpost`` command."""

import sys

from mmpost.cli import main

sys.exit(main())
