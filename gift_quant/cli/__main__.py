import sys

from gift_quant.cli.main import main

sys.exit(main())
