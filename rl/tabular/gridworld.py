"""The grid world of Zhao, *Mathematical Foundations of Reinforcement Learning* (2025), as a JAX environment.

One object serves three audiences:

* the dynamic-programming chapters get the exact model, ``P, R = env.tabular_model()`` with
  ``P [S, A, S]`` transition probabilities and ``R [S, A]`` expected rewards, ``s = row * ncols + col``;
* the sample-based chapters get a pure, jittable sample model on integer states,
  ``s_next, r, terminated = env.transition(key, s, a)`` and ``s0 = env.sample_start(key)``;
* every gymnax-style agent gets the gymnax 1.x ``Environment`` API (``reset`` and the 6-tuple ``step``
  ``(obs, state, reward, terminated, truncated, info)`` with auto-reset), observations being a one-hot
  vector ``[S]``, the ``(row, col)`` pair ``[2]`` or the state index.

Conventions are the book's (Sec. 1.2): rows and columns count from the top-left; the actions are
``up, right, down, left, stay`` in that order. A move off the grid leaves the agent in place and pays
``r_boundary``; otherwise the reward is decided by the cell the agent lands in (``r_target`` on a target,
``r_forbidden`` on a forbidden cell, ``r_other`` elsewhere), so staying on the target pays ``r_target``
and staying on a forbidden cell pays ``r_forbidden``. The agent may enter forbidden cells.

``episodic=False`` (Chapters 2-6) makes the task continuing: the target is an ordinary cell and
episodes end only by the time limit. ``episodic=True`` (Chapter 7's examples) ends the episode when a
target is entered; the tabular model then makes targets absorbing with zero reward, so ``v(target) = 0``.

``slip > 0`` makes moves stochastic: with probability ``slip`` the executed move is drawn uniformly from
the five actions instead of the chosen one, i.e. ``p(move m | action a) = (1 - slip) [m == a] + slip / 5``.
The tabular model accounts for it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces

__all__ = [
    "ACTION_DELTAS",
    "ACTION_NAMES",
    "BOOK_LAYOUT",
    "GridWorld",
    "GridWorldParams",
    "GridWorldState",
    "book_episodic_grid_world",
    "book_grid_world",
]

ACTION_NAMES = ("up", "right", "down", "left", "stay")
ACTION_DELTAS = np.array([[-1, 0], [0, 1], [1, 0], [0, -1], [0, 0]], dtype=np.int32)  # [A, 2] (d_row, d_col)

# The book's 5x5 world: target at (row 4, col 3), forbidden cells at (2,2) (2,3) (3,3) (4,2) (4,4) (5,2),
# all 1-indexed.
BOOK_LAYOUT = (".....", ".##..", "..#..", ".#T#.", ".#...")

FREE, FORBIDDEN, TARGET = ".", "#", "T"
_OBS_TYPES = ("one_hot", "coords", "index")


@struct.dataclass
class GridWorldState(environment.EnvState):
    """The agent's cell as a row-major state index, and the elapsed episode time."""

    position: jax.Array


@struct.dataclass
class GridWorldParams(environment.EnvParams):
    """Runtime parameters: the episode time limit (truncation)."""

    max_steps_in_episode: int = 100


def _parse_layout(layout: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(layout, str):
        layout = layout.strip().splitlines()
    rows = tuple(layout)
    if not rows:
        raise ValueError("layout must have at least one row, got an empty layout")
    for i, row in enumerate(rows):
        if not isinstance(row, str):
            raise ValueError(f"layout row {i} must be a string, got {row!r}")
    if not rows[0]:
        raise ValueError("layout rows must be non-empty, got an empty row 0")
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise ValueError(
                f"layout rows must all have the same length (ragged rows): row 0 has {len(rows[0])} "
                f"cells but row {i} ({row!r}) has {len(row)}"
            )
        for j, ch in enumerate(row):
            if ch not in (FREE, FORBIDDEN, TARGET):
                raise ValueError(
                    f"unknown layout character {ch!r} at row {i}, column {j}; use '.' (free), "
                    f"'#' (forbidden) or 'T' (target)"
                )
    if not any(TARGET in row for row in rows):
        raise ValueError(f"layout has no target cell 'T': {rows}")
    return rows


class GridWorld(environment.Environment[GridWorldState, GridWorldParams]):
    """Zhao's grid world: forbidden cells, target cells, five actions, optional slips.

    Args:
      layout: rows of ``'.'`` (free), ``'#'`` (forbidden) and ``'T'`` (target) characters, or one
        multi-line string. Any rectangular size; at least one target.
      r_boundary, r_forbidden, r_target, r_other: the four rewards (see the module docstring).
      episodic: whether entering a target ends the episode.
      slip: probability that the executed move is replaced by a uniformly random one.
      obs_type: ``"one_hot"`` (float32 ``[S]``), ``"coords"`` (int32 ``[2]`` = (row, col)) or
        ``"index"`` (int32 scalar ``s``) for the gymnax API.
      start: ``(row, col)`` (0-indexed) of the start cell, or ``None`` to start uniformly over every
        non-terminal cell (exploring starts over states).
      max_steps_in_episode: the default time limit of ``default_params``.
    """

    def __init__(
        self,
        layout: str | Sequence[str] = BOOK_LAYOUT,
        r_boundary: float = -1.0,
        r_forbidden: float = -1.0,
        r_target: float = 1.0,
        r_other: float = 0.0,
        episodic: bool = False,
        *,
        slip: float = 0.0,
        obs_type: str = "one_hot",
        start: tuple[int, int] | None = (0, 0),
        max_steps_in_episode: int = 100,
    ):
        self.layout = _parse_layout(layout)
        rewards = dict(r_boundary=r_boundary, r_forbidden=r_forbidden, r_target=r_target, r_other=r_other)
        for name, value in rewards.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        if not 0.0 <= slip <= 1.0:
            raise ValueError(f"slip={slip!r} must lie in [0, 1]")
        if obs_type not in _OBS_TYPES:
            raise ValueError(f"obs_type={obs_type!r} must be one of {_OBS_TYPES}")
        if int(max_steps_in_episode) < 1:
            raise ValueError(f"max_steps_in_episode={max_steps_in_episode!r} must be >= 1")
        self.r_boundary, self.r_forbidden = float(r_boundary), float(r_forbidden)
        self.r_target, self.r_other = float(r_target), float(r_other)
        self.episodic, self.slip, self.obs_type = bool(episodic), float(slip), obs_type
        self.max_steps_in_episode = int(max_steps_in_episode)
        self.nrows, self.ncols = len(self.layout), len(self.layout[0])
        cells = np.array([list(row) for row in self.layout])  # [rows, cols] characters
        self.forbidden = (cells == FORBIDDEN).reshape(-1)  # [S] bool
        self.target = (cells == TARGET).reshape(-1)  # [S] bool
        self.terminal = self.target & self.episodic  # [S] bool: states where an episode ends

        if start is not None:
            row, col = start
            if not (0 <= row < self.nrows and 0 <= col < self.ncols):
                raise ValueError(f"start={start!r} lies outside the {self.nrows}x{self.ncols} grid")
            if self.terminal[row * self.ncols + col]:
                raise ValueError(f"start={start!r} is a target cell, which is terminal when episodic=True")
            start = (int(row), int(col))
        self.start = start
        self._build_tables()

    # ----------------------------------------------------------------------------------- model
    def _build_tables(self) -> None:
        """Deterministic per-move tables and the slip distribution, the basis of both models."""
        S, M = self.num_states, len(ACTION_NAMES)
        rows, cols = np.divmod(np.arange(S), self.ncols)  # [S], [S]
        new_rows = rows[:, None] + ACTION_DELTAS[None, :, 0]  # [S, M]
        new_cols = cols[:, None] + ACTION_DELTAS[None, :, 1]  # [S, M]
        off_grid = (new_rows < 0) | (new_rows >= self.nrows) | (new_cols < 0) | (new_cols >= self.ncols)
        landed = np.where(off_grid, np.arange(S)[:, None], new_rows * self.ncols + new_cols)  # [S, M]
        reward = np.where(
            off_grid,
            self.r_boundary,
            np.where(self.target[landed], self.r_target,
                     np.where(self.forbidden[landed], self.r_forbidden, self.r_other)),
        )
        # In the episodic task a target is absorbing with zero reward (only reached by the tabular model).
        terminal = np.flatnonzero(self.terminal)
        landed[terminal] = terminal[:, None]
        reward[terminal] = 0.0
        self.next_state_table = landed.astype(np.int32)  # [S, M]
        self.reward_table = reward.astype(np.float32)  # [S, M]
        self.slip_matrix = (1.0 - self.slip) * np.eye(M) + self.slip / M  # [A, M] p(move | action)
        starts = ~self.terminal if self.start is None else np.arange(S) == self.state_index(*self.start)
        self.start_distribution = starts / starts.sum()  # [S]

    def tabular_model(self) -> tuple[jax.Array, jax.Array]:
        """The exact model: ``P [S, A, S]`` with ``P[s, a, s'] = p(s'|s, a)`` and ``R [S, A] = E[r|s, a]``.

        Arrays come in JAX's default float dtype (float64 under ``jax_enable_x64``), computed in float64.
        """
        S, A = self.num_states, self.num_actions
        landed_one_hot = np.eye(S)[self.next_state_table]  # [S, M, S]
        P = np.einsum("am,smt->sat", self.slip_matrix, landed_one_hot)  # [S, A, S]
        R = np.einsum("am,sm->sa", self.slip_matrix, self.reward_table.astype(np.float64))  # [S, A]
        assert P.shape == (S, A, S) and R.shape == (S, A)
        return jnp.asarray(P), jnp.asarray(R)

    num_uniforms = 2
    """Uniform variates consumed by one :meth:`transition_from_uniform` step (slip decision, random move)."""

    def transition_from_uniform(self, u: jax.Array, s: jax.Array, a: jax.Array
                                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One step of the integer-state sample model driven by ``u [2] ~ U[0, 1)``:
        ``(s_next, r, terminated)``. Jittable and vmappable; loops pre-draw ``u`` in bulk, which keeps
        random-number generation out of their bodies."""
        a = jnp.asarray(a, jnp.int32)
        if self.slip > 0.0:
            random_move = jnp.minimum((u[1] * self.num_actions).astype(jnp.int32), self.num_actions - 1)
            a = jnp.where(u[0] < self.slip, random_move, a)
        s_next = jnp.asarray(self.next_state_table)[s, a]
        r = jnp.asarray(self.reward_table)[s, a]
        return s_next, r, jnp.asarray(self.terminal)[s_next]

    def transition(self, key: jax.Array, s: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Sample one step of the integer-state model: ``(s_next, r, terminated)``."""
        return self.transition_from_uniform(jax.random.uniform(key, (self.num_uniforms,)), s, a)

    def start_from_uniform(self, u: jax.Array) -> jax.Array:
        """Initial state index for ``u ~ U[0, 1)`` (inverse CDF of ``start_distribution``)."""
        if self.start is not None:
            return jnp.asarray(self.state_index(*self.start), jnp.int32)
        cdf = jnp.asarray(np.cumsum(self.start_distribution), jnp.float32)  # [S]
        return jnp.minimum(jnp.sum(cdf <= u * cdf[-1]), self.num_states - 1).astype(jnp.int32)

    def sample_start(self, key: jax.Array) -> jax.Array:
        """Sample an initial state index from ``start_distribution`` (a fixed cell or uniform)."""
        return self.start_from_uniform(jax.random.uniform(key))

    # -------------------------------------------------------------------------------- geometry
    @property
    def num_states(self) -> int:
        return self.nrows * self.ncols

    @property
    def num_actions(self) -> int:
        return len(ACTION_NAMES)

    @property
    def shape(self) -> tuple[int, int]:
        return self.nrows, self.ncols

    def state_index(self, row: int, col: int) -> int:
        """Row-major index of the 0-indexed cell ``(row, col)``."""
        return row * self.ncols + col

    def coords(self, s: jax.Array) -> jax.Array:
        """``(row, col)`` of state ``s``, int32 ``[..., 2]``."""
        s = jnp.asarray(s, jnp.int32)
        return jnp.stack([s // self.ncols, s % self.ncols], axis=-1)

    # ---------------------------------------------------------------------------- gymnax API
    @property
    def default_params(self) -> GridWorldParams:
        return GridWorldParams(max_steps_in_episode=self.max_steps_in_episode)

    @property
    def name(self) -> str:
        return "GridWorld-Zhao"

    def step_env(
        self, key: jax.Array, state: GridWorldState, action: int | jax.Array, params: GridWorldParams
    ) -> tuple[Any, GridWorldState, jax.Array, jax.Array, dict[str, Any]]:
        s_next, reward, terminated = self.transition(key, state.position, action)
        next_state = GridWorldState(time=state.time + 1, position=s_next)
        obs = self.observe(key, next_state, action, params)
        return obs, next_state, reward, terminated, {}

    def reset_env(self, key: jax.Array, params: GridWorldParams) -> tuple[Any, GridWorldState]:
        state = GridWorldState(time=jnp.asarray(0, jnp.int32), position=self.sample_start(key))
        return self.observe(key, state, None, params), state

    def observe(self, key: jax.Array, state: GridWorldState, action: Any, params: GridWorldParams) -> jax.Array:
        del key, action, params
        return self.observation(state.position)

    def get_obs(self, state: GridWorldState, params: GridWorldParams | None = None, key: Any = None) -> jax.Array:
        return self.observation(state.position)

    def observation(self, s: jax.Array) -> jax.Array:
        """The observation of state index ``s`` under ``obs_type`` (vmaps over ``s``)."""
        s = jnp.asarray(s, jnp.int32)
        if self.obs_type == "one_hot":
            return jax.nn.one_hot(s, self.num_states, dtype=jnp.float32)  # [..., S]
        if self.obs_type == "coords":
            return self.coords(s)  # [..., 2]
        return s

    def is_terminated(self, state: GridWorldState, params: GridWorldParams) -> jax.Array:
        return jnp.asarray(self.terminal)[state.position]

    def action_space(self, params: GridWorldParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)

    def observation_space(self, params: GridWorldParams | None = None) -> spaces.Space:
        if self.obs_type == "one_hot":
            return spaces.Box(0.0, 1.0, (self.num_states,), jnp.float32)
        if self.obs_type == "coords":
            return spaces.Box(0, jnp.array([self.nrows - 1, self.ncols - 1]), (2,), jnp.int32)
        return spaces.Discrete(self.num_states)

    def state_space(self, params: GridWorldParams) -> spaces.Dict:
        return spaces.Dict({
            "position": spaces.Discrete(self.num_states),
            "time": spaces.Discrete(params.max_steps_in_episode + 1),
        })

    # ------------------------------------------------------------- value semantics for jit caches
    def _config(self) -> tuple:
        return (self.layout, self.r_boundary, self.r_forbidden, self.r_target, self.r_other, self.episodic,
                self.slip, self.obs_type, self.start, self.max_steps_in_episode)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._config() == self._config()

    def __hash__(self) -> int:
        return hash(self._config())

    def __repr__(self) -> str:
        return (f"GridWorld(layout={self.layout}, r_boundary={self.r_boundary}, r_forbidden={self.r_forbidden}, "
                f"r_target={self.r_target}, r_other={self.r_other}, episodic={self.episodic}, slip={self.slip}, "
                f"obs_type={self.obs_type!r}, start={self.start})")


def book_grid_world(**overrides: Any) -> GridWorld:
    """The book's baseline (Chapters 2-6): continuing, r_boundary = r_forbidden = -1, r_target = 1, r_other = 0."""
    kwargs = dict(layout=BOOK_LAYOUT, r_boundary=-1.0, r_forbidden=-1.0, r_target=1.0, r_other=0.0, episodic=False)
    return GridWorld(**{**kwargs, **overrides})


def book_episodic_grid_world(**overrides: Any) -> GridWorld:
    """Chapter 7's examples: the episode ends at the target; r_target = 0, r_forbidden = r_boundary = -10,
    r_other = -1; episodes start at the top-left cell."""
    kwargs = dict(layout=BOOK_LAYOUT, r_boundary=-10.0, r_forbidden=-10.0, r_target=0.0, r_other=-1.0,
                  episodic=True, start=(0, 0))
    return GridWorld(**{**kwargs, **overrides})
