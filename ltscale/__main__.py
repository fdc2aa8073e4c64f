import sys

from ltscale.cli import main

sys.exit(main())
