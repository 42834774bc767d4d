"""Reinforcement learning, jit-compiled end to end: the tabular curriculum (``jaxlab.rl.tabular``), deep RL
on gymnax (the modules of this package) and LLM post-training (``jaxlab.rl.llm``)."""
