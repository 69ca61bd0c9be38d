"""Package mapping (everything else is in pyproject.toml).

The folders keep the names of the project layout (toolkit/, plugins/, harness/); the
import names are prefixed so they cannot collide with other installed top-level
packages called `toolkit`, `plugins` or `harness`.
"""
from setuptools import find_packages, setup

FOLDERS = {"tshrink": "toolkit", "tshrink_plugins": "plugins", "tshrink_harness": "harness"}

packages, package_dir = [], {}
for name, folder in FOLDERS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
