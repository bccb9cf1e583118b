"""``python -m relay`` and the ``ctct-relay`` command: :func:`run`."""

import sys


def run() -> int:
    """Import the command line, then run it. A Ctrl-C during the imports (most of a second on a
    slow host) is exit status 130 like one later, not a KeyboardInterrupt traceback."""
    try:
        from relay.cli import main  # inside the try: the imports are what takes the time
    except KeyboardInterrupt:
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
