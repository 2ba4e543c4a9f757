from pathlib import Path

from setuptools import setup

setup(
    name="metaembed",
    version="0.1.0",
    description="MetaEmbed multimodal multi-vector retrieval on Qwen-VL backbones, as a Hugging Face Hub package",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=[
        "configuration_metaembed",
        "processing_metaembed",
        "modeling_metaembed",
        "scoring_metaembed",
        "pipeline_metaembed",
        "sentence_transformers_metaembed",
        "tiny_metaembed",
        "training_metaembed",
        "conversion_metaembed",
        "demo_metaembed",
        "cli_metaembed",
        "index_metaembed",
        "qdrant_metaembed",
    ],
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "huggingface-hub>=1.0",
        "safetensors>=0.4",
        "sentence-transformers>=6.0",
        "pillow>=10.0",
    ],
    extras_require={
        "train": ["peft>=0.15", "datasets>=3.0", "accelerate>=1.0", "matplotlib>=3.8"],
        "search": ["faiss-cpu>=1.8", "qdrant-client>=1.12"],
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "peft>=0.15",
            "datasets>=3.0",
            "accelerate>=1.0",
            "matplotlib>=3.8",
            "faiss-cpu>=1.8",
            "qdrant-client>=1.12",
        ],
    },
    entry_points={"console_scripts": ["metaembed=cli_metaembed:main"]},
)
