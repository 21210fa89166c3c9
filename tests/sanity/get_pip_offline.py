# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Stand-in for ansible-test's pip bootstrap script on machines that reach only PyPI.

ansible-test creates its sanity virtual environments without pip and
downloads a bootstrap script from a host outside PyPI to install it.
`make sanity` puts this file in that script's cache instead: it installs pip
from the interpreter's own ensurepip, then installs the requested packages
from the package index.
"""

from __future__ import annotations

import subprocess
import sys

# Options of the real bootstrap script that pip itself does not know.
BOOTSTRAP_ONLY_OPTIONS = {"--no-setuptools", "--no-wheel"}


def main():
    args = [arg for arg in sys.argv[1:] if arg not in BOOTSTRAP_ONLY_OPTIONS]
    subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", *args])


if __name__ == "__main__":
    main()
