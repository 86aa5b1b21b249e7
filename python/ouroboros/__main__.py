import sys

from ouroboros.cli.entry import main

sys.exit(main())
