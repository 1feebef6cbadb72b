import sys

from tests.vm.run import main

sys.exit(main())
