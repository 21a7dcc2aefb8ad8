import sys

from mesh_middleware.cli import main

sys.exit(main())
