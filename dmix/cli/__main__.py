import sys

from dmix.cli import main

sys.exit(main())
