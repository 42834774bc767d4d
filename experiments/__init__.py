"""Reproduced paper figures. Every module here is discovered by ``jaxlab.registry.discover``;
an experiment is added by writing a module that applies ``@register_experiment``."""
