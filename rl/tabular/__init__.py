"""Tabular reinforcement learning, after Zhao, *Mathematical Foundations of Reinforcement Learning* (2025).

The course runs on one environment, the book's grid world, from the exact model (Chapters 2-4) through
sampled returns and stochastic approximation (Chapters 5-7) to function approximation and policy
gradients (Chapters 8-10). Every algorithm is a pure function of a PRNG key, jittable and vmappable over
seeds; policies are tables ``pi [S, A]``, values ``v [S]`` and ``q [S, A]``.

* ``gridworld`` (Ch. 1): ``GridWorld`` with the exact model ``tabular_model() -> P [S, A, S], R [S, A]``,
  a jittable sample model and the gymnax 1.x API; ``book_grid_world``, ``book_episodic_grid_world``.
* ``plot``: ``plot_grid_world(s)``, values as a heat map and the policy as arrows, with whatever
  matplotlib backend is active.
* ``dynamic_programming`` (Ch. 2-4): Bellman operators, policy evaluation (closed form or iterative),
  value iteration, policy iteration, truncated policy iteration, ``epsilon_greedy_optimum``.
* ``common``: what the sample-based methods share: greedy, epsilon-greedy and uniform policies, action
  sampling, discounted returns, fixed-length rollouts, the online episode loop.
* ``monte_carlo`` (Ch. 5): MC Basic, MC Exploring Starts, MC epsilon-greedy.
* ``stochastic_approximation`` (Ch. 6): incremental mean estimation, Robbins-Monro, BGD / MBGD / SGD.
* ``td`` (Ch. 7, Secs. 8.2-8.3): TD(0), Sarsa, Expected Sarsa, n-step Sarsa and Q-learning, each written
  once for linear features (one-hot features give the tabular case).
* ``value_approximation`` (Ch. 8): polynomial and Fourier features, the TD-linear fixed point, and deep
  Q-learning on the grid (``GridDQNConfig``, on deep RL's ``jaxlab.rl.networks.QNetwork``).
* ``policy_gradient`` (Ch. 9-10): REINFORCE, QAC, A2C, off-policy actor-critic and the deterministic
  policy gradient, with softmax policies over linear features.

Deep RL on gymnax (``jaxlab.rl.dqn``, ``jaxlab.rl.reinforce``, ``jaxlab.rl.a2c``, ...) lives beside this
package in ``jaxlab.rl``; its algorithms share no module with the tabular ones.
"""
