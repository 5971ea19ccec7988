import sys

from gateway.cli import main

if __name__ == "__main__":  # a helper process (gateway.offload) imports this module too: it must not start a gateway
    sys.exit(main())
