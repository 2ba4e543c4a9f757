"""Installs the Hub set (the `*_metaembed` modules remote code needs) and the `metaembed` tooling package.

The Hub files that are not importable modules (`handler.py`, `model_card.md`, `requirements.txt`) are copied into
the installed package as `metaembed/hub_files/`, where `save_pretrained` finds them: nothing is installed under
a generic top-level name such as `handler`.
"""

import ast
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def hub_files() -> tuple[str, ...]:
    """`HUB_FILES` of modeling_metaembed.py, the one declared list (read, not imported: no torch at build)."""
    for node in ast.parse((ROOT / "modeling_metaembed.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "HUB_FILES" for target in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("HUB_FILES not found in modeling_metaembed.py")


HUB_FILES = hub_files()
HUB_MODULES = [name.removesuffix(".py") for name in HUB_FILES if name.endswith("_metaembed.py")]
HUB_DATA_FILES = [name for name in HUB_FILES if not name.endswith("_metaembed.py")]


class BuildWithHubFiles(build_py):
    """build_py, plus the Hub files that are not modules, under metaembed/hub_files/."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "metaembed" / "hub_files"
        target.mkdir(parents=True, exist_ok=True)
        for name in HUB_DATA_FILES:
            shutil.copyfile(ROOT / name, target / name)


requirements = [
    line.strip()
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="metaembed",
    version="0.2.0",
    description="MetaEmbed multimodal multi-vector retrieval on vision-language backbones, a Hugging Face Hub package",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=HUB_MODULES,
    packages=find_packages(include=["metaembed", "metaembed.*"]),
    cmdclass={"build_py": BuildWithHubFiles},
    install_requires=requirements,
    extras_require={
        # pytrec-eval-terrier: `metaembed demo` evaluates the models it trains
        "train": ["peft>=0.15", "datasets>=3.0", "accelerate>=1.0", "matplotlib>=3.8", "pytrec-eval-terrier>=0.5"],
        # numba: the one-query search kernel (metaembed/search/single_query.py); without it torch's kernel runs
        "search": ["faiss-cpu>=1.8", "qdrant-client>=1.12", "numba>=0.61"],
        "eval": ["pytrec-eval-terrier>=0.5", "datasets>=3.0", "mteb>=2.26", "matplotlib>=3.8"],
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            # tests/test_install.py builds a wheel without build isolation
            "setuptools>=70.1",
            "wheel>=0.40",
            "hypothesis>=6.100",
            "peft>=0.15",
            "datasets>=3.0",
            "accelerate>=1.0",
            "matplotlib>=3.8",
            "faiss-cpu>=1.8",
            "qdrant-client>=1.12",
            "numba>=0.61",
            "pytrec-eval-terrier>=0.5",
            "mteb>=2.26",
        ],
    },
    entry_points={"console_scripts": ["metaembed=metaembed.cli:main"]},
)
