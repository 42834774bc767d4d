"""Reproduced paper figures. Every module here is discovered by ``jaxlab.registry``: a scan of
the sources finds each ``@register_experiment("name", ...)`` and a lookup imports only the module
that registers that name (a name computed at run time also works, by importing its module on
every lookup); an experiment is added by writing a module that applies the decorator."""
