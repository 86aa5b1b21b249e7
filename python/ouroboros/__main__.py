import sys

from ouroboros.cli.main import main

sys.exit(main())
