"""jaxlab: functional JAX/Flax reimplementations, one installable package.

The top-level folders of the repository are subpackages of this namespace:
``jaxlab.kernels`` (pure array ops), ``jaxlab.models`` (Flax modules), ``jaxlab.rl``,
``jaxlab.parallel`` and ``jaxlab.experiments``. This folder holds only the glue: the CLI,
the experiment/trainer registry, configs, train state, checkpointing and metrics logging.
"""

__version__ = "0.1.0"
