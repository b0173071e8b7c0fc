"""Stand-in for the get-pip.py that ansible-test downloads to bootstrap pip into its virtualenvs.

ansible-test fetches get-pip.py from a host outside the package registries; this does the same job
with the official pip wheel from PyPI: `pip install --upgrade --force-reinstall ARGS`.
tests/sanity/run.sh fills in the wheel's path and puts it where ansible-test looks for its cached copy.
"""

import sys

sys.path.insert(0, "@PIP_WHEEL@")  # pip runs from its wheel, as get-pip.py runs from its embedded zip

from pip._internal.cli.main import main

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(main(["install", "--upgrade", "--force-reinstall", *args]))
