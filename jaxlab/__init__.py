"""jaxlab: functional JAX/Flax reimplementations, one installable package.

The top-level folders of the repository are subpackages of this namespace:
``jaxlab.kernels`` (pure array ops), ``jaxlab.models`` (Flax modules), ``jaxlab.rl``,
``jaxlab.parallel`` and ``jaxlab.experiments``. This folder holds only the glue: the CLI
(``cli``), the experiment/trainer registry (``registry``, ``reproduce``), the training spine
(``train_state``, ``optim``, ``loop``, ``checkpoint``), metrics logging (``metrics``) and config
validation helpers (``validation``).
"""

__version__ = "0.1.0"
