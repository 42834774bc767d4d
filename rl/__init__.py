"""Reinforcement learning, jit-compiled end to end: tabular curriculum, deep RL on gymnax, LLM post-training."""
