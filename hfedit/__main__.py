import sys

from hfedit.cli import main

sys.exit(main())
