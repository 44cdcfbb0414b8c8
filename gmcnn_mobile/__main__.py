"""``python -m gmcnn_mobile COMMAND ...``: the same as the ``gmcnn-mobile`` console script."""
import sys

from .cli import main

sys.exit(main())
