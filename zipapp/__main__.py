import sys

import websockify_min

sys.exit(websockify_min.main())
