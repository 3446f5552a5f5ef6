from setuptools import find_packages, setup

setup(
    name="llava-jax",
    version="0.1.0",
    description="LLaVA (1.0, 1.5, 1.6/NeXT) in JAX/Flax: checkpoint import, training, decoding, evaluation.",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "numpy>=1.26",
        "ml-dtypes>=0.5",
        "pillow>=10",
        "sentencepiece>=0.2",
        "protobuf>=4",  # reads sentencepiece tokenizer.model files
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "absl-py>=2",
        "ml-collections>=1",
        "tqdm>=4.60",
        "tensorboardX>=2.6",  # TensorBoard event files of training runs
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch==2.13.0",
            "transformers==5.23.0",
            "protobuf>=4",
            "peft==0.21.2",  # reads the LoRA adapters we export
            "hypothesis>=6.100",  # fuzzes the file readers
        ],
        "gguf": ["gguf>=0.17"],
        "quant": ["qwix==0.1.8"],
        # lmms-eval without its ~50 dependencies (torchvision, a CUDA torch, wandb, openai, ...): install it with
        # `pip install --no-deps lmms-eval==0.7.3` and then this extra, which holds what its evaluator really imports.
        "lmms": [
            "loguru==0.7.3", "sacrebleu==2.6.0", "portalocker==4.4.2", "tabulate==0.10.0", "colorama==0.4.6",
            "lxml==6.1.3", "evaluate==0.4.6", "datasets==5.2.0", "multiprocess==0.70.19", "pandas==3.1.1",
            "python-dateutil==4.0.0", "pyarrow==26.0.1", "dill==0.4.1", "xxhash==4.1.0", "pytz==2026.6",
            "tenacity==9.2.1", "aiohttp==3.14.5", "multidict==7.2.1", "attrs==26.1.0", "yarl==1.25.1",
            "propcache==0.5.4", "aiohappyeyeballs==2.7.1", "aiosignal==1.4.0", "frozenlist==1.8.0",
        ],  # fmt: skip
    },
    entry_points={"lmms_eval.models": ["llava_jax = llava_jax.eval.lmms_model:manifest"]},
)
