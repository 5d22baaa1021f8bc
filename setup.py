"""Package `scale`: MoCo v3 self-supervised ViT pretraining, from one CPU to GPU clusters."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="scale",
    version="0.1.0",
    description="MoCo v3 pretraining of Vision Transformers, scaled with DDP, FSDP2 and DeepSpeed ZeRO",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["scale", "scale.*", "benchmarks", "benchmarks.*"]),
    install_requires=[
        # FSDP2's fully_shard is public from 2.6 on.
        "torch>=2.6",
        "torchvision>=0.21",
        "timm>=1.0",
        "numpy>=1.24",
        "webdataset>=0.2.86",
        "pillow>=9",
        "tqdm>=4.60",
        # the bundled demo set (load_digits) and its split
        "scikit-learn>=1.2",
        "tensorboard>=2.10",
        # scale-plot
        "matplotlib>=3.5",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "scipy>=1.10"],
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "deepspeed": ["deepspeed>=0.14"],
    },
    entry_points={
        "console_scripts": [
            "scale-convert-checkpoint=scale.convert_checkpoint:cli",
            "scale-flops=benchmarks.flops:cli",
            "scale-throughput=benchmarks.throughput:cli",
            "scale-memory=benchmarks.memory:cli",
            "scale-make-shards=scale.make_shards:cli",
            "scale-pretrain=scale.pretrain:cli",
            "scale-finetune=scale.finetune:cli",
            "scale-linear-probe=scale.linear_probe:cli",
            "scale-knn-eval=scale.knn_eval:cli",
            "scale-plot=scale.plot:cli",
        ],
    },
)
