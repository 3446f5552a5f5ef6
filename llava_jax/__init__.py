"""llava-jax: LLaVA in JAX/Flax. The public face: `load`, `Pipeline`, `LlavaConfig`."""

from llava_jax.config import LlavaConfig

__all__ = ["LlavaConfig", "load", "Pipeline"]


def __getattr__(name):
    # Imported lazily so that `import llava_jax` (e.g. for configs) stays light.
    if name in ("load", "Pipeline"):
        from llava_jax import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
