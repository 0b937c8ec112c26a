"""Package metadata, read from settings.ini (nbdev 2 layout) without pkg_resources."""
from configparser import ConfigParser

from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
c = cfg["DEFAULT"]

setup(
    name=c["lib_name"],
    version=c["version"],
    description=c["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=c["author"],
    license="Apache-2.0",
    python_requires=">=" + c["min_python"],
    packages=find_packages(include=["rlbook", "rlbook.*"]),
    include_package_data=True,
    install_requires=c["requirements"].split(),
    extras_require={"dev": c["dev_requirements"].split(), "trl": ["trl"], "vllm": ["vllm>=0.10.2,<0.18"],
                    "deepspeed": ["deepspeed>=0.15"]},
    entry_points={"console_scripts": c["console_scripts"].split()},
    zip_safe=False,
)
