"""python -m ofmipd"""

import sys

from ofmipd.cli import main

sys.exit(main())
