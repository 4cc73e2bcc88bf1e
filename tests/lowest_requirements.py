"""Print the pip requirements that pin torch and MONAI to the lowest versions setup.cfg declares.

``make test-lowest`` installs these in a second environment and runs the training tests there, so the ranges
in setup.cfg are the ranges the tests run: ``python tests/lowest_requirements.py`` prints
``torch==2.5.1 monai[...]==1.5.0`` for ``torch>=2.5.1`` and ``monai[...]>=1.5.0,<1.7``.
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"
PINNED = ("torch", "monai")


def lowest_requirements(setup_cfg: Path = SETUP_CFG, names: tuple[str, ...] = PINNED) -> list[str]:
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    requirements = [line.strip() for line in config["options"]["install_requires"].splitlines() if line.strip()]
    pinned = []
    for name in names:
        for requirement in requirements:
            match = re.fullmatch(rf"({re.escape(name)}(?:\[[^\]]*\])?)\s*>=\s*([0-9][0-9.]*)(?:\s*,.*)?", requirement)
            if match:
                pinned.append(f"{match.group(1)}=={match.group(2)}")
                break
        else:
            raise SystemExit(f"{setup_cfg}: no '{name}>=X' requirement in install_requires")
    return pinned


if __name__ == "__main__":
    print(" ".join(lowest_requirements(names=tuple(sys.argv[1:]) or PINNED)))
